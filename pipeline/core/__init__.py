"""What every package stands on: `config` (params.yaml as typed params), `paths` (where every
file lives), `common` (errors, atomic writes, logging, the CLI wrapper) and `encoders` (the
encoder names both models and params know)."""
