# pgguard.auth
