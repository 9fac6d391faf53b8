"""How a stage runs: params read strictly into typed configs, process groups, output claims,
atomic files, one-line errors."""
