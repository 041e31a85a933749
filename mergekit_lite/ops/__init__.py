"""Plan builders (upcycle, graft) and the one executor that streams a plan to disk."""
