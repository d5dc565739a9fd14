"""Cluster mode: many mqttd nodes acting as one broker over Redis (issue 10)."""
