#include "common/clock.h"

namespace spotrain::common {

RealClock* RealClock::Get() {
  static RealClock* clock = new RealClock();
  return clock;
}

}  // namespace spotrain::common
