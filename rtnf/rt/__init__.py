"""The real-time loop: window clock, ring buffers, per-window inference, control rules, telemetry
and the recorder (`rtnf run`, `rtnf demo`)."""
