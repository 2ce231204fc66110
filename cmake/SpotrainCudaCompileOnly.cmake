# Compile-only CUDA mode: used when nvcc and the CUDA headers are present but the toolkit's
# runtime libraries (libcudart, libcudart_static, libcublas, libcublasLt) are not, so that
# enable_language(CUDA) would fail (CMake links a test program against libcudart_static).
# The CUDA sources are then still compiled on every build, so that they cannot rot:
#   - .cu files by nvcc -c through add_custom_command, with the flags the normal build uses;
#   - the CUDA-using .cc files as OBJECT libraries compiled by the C++ compiler with the CUDA
#     include directory and SPOTRAIN_HAVE_CUDA=1, as the normal build does.
# Nothing is linked against CUDA, no CUDA executable is built and no GPU test is registered.
# Every compile step hangs off one target, spotrain_cuda_compile_check, built by default.
#
# The normal path (enable_language(CUDA), real libraries, gpu tests) does not use this file
# except for spotrain_cuda_missing_runtime_libraries(), which decides between the two.

# Sets <out_var> to the names of the CUDA libraries the normal build needs that cannot be
# found for the toolkit of <nvcc> (empty when all are there). Looks in the toolkit's lib,
# lib64, lib/<arch>, targets/*/lib and the system's default library paths. NO_CACHE: the
# answer follows the disk on every configure.
function(spotrain_cuda_missing_runtime_libraries nvcc out_var)
  get_filename_component(bin_dir "${nvcc}" DIRECTORY)
  get_filename_component(root "${bin_dir}" DIRECTORY)
  set(hints "${root}/lib" "${root}/lib64")
  if(CMAKE_LIBRARY_ARCHITECTURE)
    list(APPEND hints "${root}/lib/${CMAKE_LIBRARY_ARCHITECTURE}")
  endif()
  file(GLOB target_lib_dirs LIST_DIRECTORIES true "${root}/targets/*/lib")
  list(APPEND hints ${target_lib_dirs})
  set(missing "")
  foreach(lib cudart cudart_static cublas cublasLt)
    find_library(spotrain_probe_${lib} NAMES ${lib} HINTS ${hints} NO_CACHE)
    if(NOT spotrain_probe_${lib})
      list(APPEND missing ${lib})
    endif()
  endforeach()
  set(${out_var} "${missing}" PARENT_SCOPE)
  set(SPOTRAIN_CUDA_TOOLKIT_ROOT "${root}" PARENT_SCOPE)
endfunction()

# Turns a CMAKE_CUDA_ARCHITECTURES list (80;86-real;90-virtual;90a) into nvcc -gencode flags,
# the same code CMake generates for it: N -> compute_N PTX + sm_N SASS, N-real -> SASS only,
# N-virtual -> PTX only. all / all-major / native have no meaning without a GPU or CMake's
# CUDA support: they fall back to the default list.
function(spotrain_cuda_gencode_flags archs out_var)
  if(archs MATCHES "^(all|all-major|native)$" OR archs STREQUAL "")
    set(archs "80;86;89;90")
  endif()
  set(flags "")
  foreach(arch ${archs})
    if(arch MATCHES "^([0-9]+[a-z]?)-real$")
      list(APPEND flags "--generate-code=arch=compute_${CMAKE_MATCH_1},code=[sm_${CMAKE_MATCH_1}]")
    elseif(arch MATCHES "^([0-9]+[a-z]?)-virtual$")
      list(APPEND flags
           "--generate-code=arch=compute_${CMAKE_MATCH_1},code=[compute_${CMAKE_MATCH_1}]")
    elseif(arch MATCHES "^([0-9]+[a-z]?)$")
      list(APPEND flags "--generate-code=arch=compute_${arch},code=[compute_${arch},sm_${arch}]")
    else()
      message(FATAL_ERROR "spotrain: cannot read CUDA architecture \"${arch}\"")
    endif()
  endforeach()
  set(${out_var} "${flags}" PARENT_SCOPE)
endfunction()

# Called from the top-level CUDA detection block when nvcc exists but runtime libraries are
# missing. Checks that nvcc compiles a tiny kernel; on success sets SPOTRAIN_CUDA_COMPILE_ONLY
# (and the flags below) in the caller's scope and creates spotrain_cuda_compile_check.
#   SPOTRAIN_CUDA_COMPILE_ONLY_FLAGS   nvcc flags: build type, -std=c++17, -gencode ...
#   SPOTRAIN_CUDA_COMPILE_ONLY_INCLUDE the toolkit's include directories (for g++)
macro(spotrain_cuda_enable_compile_only nvcc missing)
  set(_spotrain_archs "${CMAKE_CUDA_ARCHITECTURES}")
  if(NOT _spotrain_archs AND DEFINED ENV{SPOTRAIN_CUDA_ARCHITECTURES})
    set(_spotrain_archs "$ENV{SPOTRAIN_CUDA_ARCHITECTURES}")
  endif()
  spotrain_cuda_gencode_flags("${_spotrain_archs}" _spotrain_gencode)
  # The flags CMake's CUDA support would use for this build type (CMAKE_CUDA_FLAGS_<CONFIG>).
  string(TOUPPER "${CMAKE_BUILD_TYPE}" _spotrain_bt)
  if(_spotrain_bt STREQUAL "DEBUG")
    set(_spotrain_bt_flags -g)
  elseif(_spotrain_bt STREQUAL "RELWITHDEBINFO")
    set(_spotrain_bt_flags -O2 -g -DNDEBUG)
  elseif(_spotrain_bt STREQUAL "MINSIZEREL")
    set(_spotrain_bt_flags -O1 -DNDEBUG)
  else()
    set(_spotrain_bt_flags -O3 -DNDEBUG)
  endif()
  separate_arguments(_spotrain_user_flags UNIX_COMMAND "${CMAKE_CUDA_FLAGS}")
  set(_spotrain_nvcc_flags ${_spotrain_user_flags} ${_spotrain_bt_flags} -std=c++17
      ${_spotrain_gencode})
  if(CMAKE_CUDA_HOST_COMPILER)
    list(APPEND _spotrain_nvcc_flags -ccbin ${CMAKE_CUDA_HOST_COMPILER})
  endif()

  # Does nvcc compile at all (host compiler accepted, headers present)?
  set(_spotrain_probe_dir ${CMAKE_BINARY_DIR}/CMakeFiles/spotrain_cuda_probe)
  file(MAKE_DIRECTORY ${_spotrain_probe_dir})
  file(WRITE ${_spotrain_probe_dir}/probe.cu
       "#include <cuda_runtime.h>\n__global__ void Probe(float* x) { x[threadIdx.x] += 1.0f; }\n")
  execute_process(
    COMMAND ${nvcc} ${_spotrain_nvcc_flags} -c probe.cu -o probe.o
    WORKING_DIRECTORY ${_spotrain_probe_dir}
    RESULT_VARIABLE _spotrain_probe_rc OUTPUT_VARIABLE _spotrain_probe_out
    ERROR_VARIABLE _spotrain_probe_out)
  string(REPLACE ";" " " _spotrain_missing_text "${missing}")
  if(NOT _spotrain_probe_rc EQUAL 0)
    string(CONCAT _spotrain_msg "CUDA runtime libraries missing under ${SPOTRAIN_CUDA_TOOLKIT_ROOT} "
        "(${_spotrain_missing_text}) and ${nvcc} cannot compile a test kernel either:\n"
        "${_spotrain_probe_out}")
    if(SPOTRAIN_CUDA STREQUAL "ON")
      message(FATAL_ERROR "${_spotrain_msg}")
    endif()
    message(WARNING "${_spotrain_msg}\nCUDA sources are NOT compiled (SPOTRAIN_CUDA=AUTO).")
  else()
    set(SPOTRAIN_CUDA_COMPILE_ONLY ON)
    set(SPOTRAIN_CUDA_COMPILE_ONLY_NVCC ${nvcc})
    set(SPOTRAIN_CUDA_COMPILE_ONLY_FLAGS ${_spotrain_nvcc_flags})
    set(SPOTRAIN_CUDA_COMPILE_ONLY_INCLUDE ${SPOTRAIN_CUDA_TOOLKIT_ROOT}/include)
    if(EXISTS ${SPOTRAIN_CUDA_TOOLKIT_ROOT}/include/cccl)
      list(APPEND SPOTRAIN_CUDA_COMPILE_ONLY_INCLUDE ${SPOTRAIN_CUDA_TOOLKIT_ROOT}/include/cccl)
    endif()
    string(CONCAT SPOTRAIN_CUDA_COMPILE_ONLY_MESSAGE
           "CUDA runtime libraries missing under ${SPOTRAIN_CUDA_TOOLKIT_ROOT} "
           "(${_spotrain_missing_text}): CUDA sources compiled only (compile-only mode), "
           "GPU tests not built")
    message(WARNING "spotrain: ${SPOTRAIN_CUDA_COMPILE_ONLY_MESSAGE}. No CUDA library, "
            "CUDA executable or gpu test is linked; the CPU build is unaffected. Restore the "
            "toolkit's lib/ (or configure with -DSPOTRAIN_CUDA=OFF) to leave this mode.")
    add_custom_target(spotrain_cuda_compile_check ALL
                      COMMENT "spotrain: CUDA sources compiled (compile-only mode)")
  endif()
endmacro()

# spotrain_cuda_compile_only(<name> [CU <.cu files>] [CC <.cc files>] [LIBS <targets>])
# Compiles the given sources in compile-only mode: the .cc files into the OBJECT library
# spotrain_cuda_compile_check_<name>_cc, the .cu files by nvcc into objects under
# <binary dir>/cuda_compile_check/<name>/ (target spotrain_cuda_compile_check_<name>). LIBS
# give the usage requirements (include directories, definitions) as target_link_libraries
# would; nothing is linked.
function(spotrain_cuda_compile_only name)
  cmake_parse_arguments(ARG "" "" "CU;CC;LIBS" ${ARGN})
  set(target spotrain_cuda_compile_check_${name})
  # The OBJECT library both compiles the .cc files and carries the usage requirements that
  # the nvcc command lines read back through generator expressions.
  set(cc_sources ${ARG_CC})
  if(NOT cc_sources)
    set(cc_sources ${PROJECT_SOURCE_DIR}/common/empty.cc)
  endif()
  add_library(${target}_cc OBJECT ${cc_sources})
  target_include_directories(${target}_cc PRIVATE ${PROJECT_SOURCE_DIR})
  target_include_directories(${target}_cc SYSTEM PRIVATE ${SPOTRAIN_CUDA_COMPILE_ONLY_INCLUDE})
  target_compile_definitions(${target}_cc PRIVATE SPOTRAIN_HAVE_CUDA=1)
  target_link_libraries(${target}_cc PRIVATE ${ARG_LIBS})

  # Include directories and definitions for nvcc, without the compiler's implicit include
  # directories (an explicit -I/usr/include breaks libstdc++'s #include_next).
  set(implicit_regex "^$")
  # nvcc itself adds <toolkit>/include/cccl as a system directory: keep it so.
  foreach(dir ${CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES} /usr/include /usr/local/include
              ${SPOTRAIN_CUDA_TOOLKIT_ROOT}/include/cccl)
    string(REGEX REPLACE "([][+.*()^$?|\\\\])" "\\\\\\1" dir_regex "${dir}")
    string(APPEND implicit_regex "|^${dir_regex}/?$")
  endforeach()
  set(incs "$<FILTER:$<TARGET_PROPERTY:${target}_cc,INCLUDE_DIRECTORIES>,EXCLUDE,${implicit_regex}>")
  set(defs "$<TARGET_PROPERTY:${target}_cc,COMPILE_DEFINITIONS>")

  set(objects "")
  foreach(source ${ARG_CU})
    get_filename_component(base ${source} NAME)
    set(object ${CMAKE_CURRENT_BINARY_DIR}/cuda_compile_check/${name}/${base}.o)
    file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${source})
    add_custom_command(
      OUTPUT ${object}
      COMMAND ${SPOTRAIN_CUDA_COMPILE_ONLY_NVCC} ${SPOTRAIN_CUDA_COMPILE_ONLY_FLAGS}
              "$<$<BOOL:${incs}>:-I$<JOIN:${incs},;-I>>"
              "$<$<BOOL:${defs}>:-D$<JOIN:${defs},;-D>>"
              -MD -MF ${object}.d -c ${source} -o ${object}
      DEPENDS ${source}
      DEPFILE ${object}.d
      COMMAND_EXPAND_LISTS VERBATIM
      COMMENT "nvcc (compile-only) ${rel}")
    list(APPEND objects ${object})
  endforeach()
  add_custom_target(${target} DEPENDS ${objects})
  # Generated headers (proto/*.pb.h) of the libraries must exist before nvcc runs.
  add_dependencies(${target} ${target}_cc)
  foreach(lib ${ARG_LIBS})
    if(TARGET ${lib})
      get_target_property(imported ${lib} IMPORTED)
      if(NOT imported)
        add_dependencies(${target} ${lib})
      endif()
    endif()
  endforeach()
  add_dependencies(spotrain_cuda_compile_check ${target})
endfunction()
