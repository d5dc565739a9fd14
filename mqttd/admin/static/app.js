fetch("/api/stats")
