"""Tracking with MLflow: writer.py (the Tracker a job logs its run through, and the reaper of orphaned runs),
host.py (where and what ran: host, launcher and git tags, the job's pid and start stamp)."""
