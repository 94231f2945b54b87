# The shape of a SQL text: literals replaced by '?', everything else verbatim.

cpdef bytes shape(bytes sql)
