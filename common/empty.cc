// Keeps libraries with no sources of their own yet valid.
