"""Telemetry shared by training and serving: the catalogue of Ray metrics (`dimoe.telemetry.catalogue`)."""
