# pgguard.policy
