"""Training: the batch collator, the DMAR + EBCMC objective, telemetry, the Ray Train worker loop
and the launcher (single stage or the chained curriculum)."""
