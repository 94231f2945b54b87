# Postgres message type bytes as C constants: the names pgguard.protocol.messages gives
# them in Python (QUERY, READY_FOR_QUERY, ...), so `if t == QUERY:` reads the same in
# both layers and compiles to the same integer comparison as `t == 81`.
# cimport the names a module uses: `from .msgtypes cimport QUERY, SYNC`.

cdef enum:
    # frontend (client -> server)
    QUERY = 81                  # 'Q'
    PARSE = 80                  # 'P'
    BIND = 66                   # 'B'
    DESCRIBE = 68               # 'D'
    EXECUTE = 69                # 'E'
    CLOSE = 67                  # 'C'
    SYNC = 83                   # 'S'
    FLUSH = 72                  # 'H'
    FUNCTION_CALL = 70          # 'F'
    TERMINATE = 88              # 'X'
    COPY_FAIL = 102             # 'f'
    # both directions
    COPY_DATA = 100             # 'd'
    COPY_DONE = 99              # 'c'
    # backend (server -> client)
    READY_FOR_QUERY = 90        # 'Z'
    ERROR_RESPONSE = 69         # 'E'
    NOTICE_RESPONSE = 78        # 'N'
    ROW_DESCRIPTION = 84        # 'T'
    DATA_ROW = 68               # 'D'
    NO_DATA = 110               # 'n'
    COMMAND_COMPLETE = 67       # 'C'
    EMPTY_QUERY_RESPONSE = 73   # 'I'
    PORTAL_SUSPENDED = 115      # 's'
    PARSE_COMPLETE = 49         # '1'
    BIND_COMPLETE = 50          # '2'
    CLOSE_COMPLETE = 51         # '3'
    PARAMETER_DESCRIPTION = 116 # 't'
    PARAMETER_STATUS = 83       # 'S'
    NOTIFICATION_RESPONSE = 65  # 'A'
    FUNCTION_CALL_RESPONSE = 86 # 'V'
    COPY_IN_RESPONSE = 71       # 'G'
    COPY_OUT_RESPONSE = 72      # 'H'
    COPY_BOTH_RESPONSE = 87     # 'W'
    # what Describe and Close name (their first byte)
    TARGET_STATEMENT = 83       # 'S'
    TARGET_PORTAL = 80          # 'P'
    # ReadyForQuery's transaction status byte
    TX_IDLE = 73                # 'I'
    TX_IN_BLOCK = 84            # 'T'
    TX_FAILED = 69              # 'E'
    # not on the wire: an event the masking lane adds for the statement tracker (the
    # next ErrorResponse as the client gets it, scrubbed)
    SCRUBBED_ERROR = 1
