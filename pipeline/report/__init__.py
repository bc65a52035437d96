"""The report users read, built from the earlier stages' outputs: `tables` (read and checked),
`panels` (qualitative predictions), `content` (the blocks, in order), `writers` (md, xlsx),
`html`, `plots`, `palette` (class colours), `recipe` (autoconf's section) and `candidate` (the
model to register). The stage `pipeline.stages.report` wires them."""
