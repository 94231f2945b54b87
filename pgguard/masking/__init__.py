# pgguard.masking
