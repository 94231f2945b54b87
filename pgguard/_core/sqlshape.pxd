# The shape of a SQL text: literals replaced by NUL, everything else verbatim.

cpdef bytes shape(bytes sql)
cdef bytes shape_buf(const unsigned char* p, Py_ssize_t n)
