"""Pure-function model parts: every part is `init(cfg, key) -> params` and
`apply(cfg, params, inputs, ...) -> outputs`, params being plain nested dicts."""
