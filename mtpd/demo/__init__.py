"""The digits demo: teachers, a baseline, stores, ordering and a progressive plan, end to end (`mtpd-demo`)."""
