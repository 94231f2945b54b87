# pgguard.protocol
