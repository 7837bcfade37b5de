"""The experiment machinery: specs (`spec`), config overrides (`overrides`), the sweep runner (`sweep`), results
and statistics (`results`) and plots (`plots`). The experiments themselves are the modules one level up."""
