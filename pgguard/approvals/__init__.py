# pgguard.approvals
