"""RunPod deployment: pod and volume lifecycle, readiness wait, idle auto-stop, cost."""
