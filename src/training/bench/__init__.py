"""The benchmark (`python -m training.bench`): cost split (`cost`, `cost_report`, `memory`), estimation error
and quality at a fixed budget (`train`, `runs`, `targets`), GPU throughput (`gpu`); shared pieces in `common`."""
