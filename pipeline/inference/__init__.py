"""From a trained model to scores: the full-image forward (`forward`), overlap-tile prediction
(`tiling`), split-level evaluation (`evaluate`), metrics, and model statistics (`stats`:
parameters, FLOPs, latency)."""
