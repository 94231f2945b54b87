# The shape of a SQL text: literals replaced by NUL, everything else verbatim.

cpdef bytes shape(bytes sql)
