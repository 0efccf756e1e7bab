"""Recipe schema, loader and `key=value` overrides.

A recipe is YAML; its schema is the dataclasses below. Loading validates every key against the
schema and coerces values to the declared types (so `lr: 5e-5`, which PyYAML reads as a string,
becomes a float). Any mistake raises `UserError` with one line that names the file, the key and
what is allowed. Overrides on the command line (`optim.lr=1e-4`) are merged into the raw YAML
first, so they are typed and checked by exactly the same code.

The package is split by role: ranges.py (the small range types), schema.py (the dataclasses),
loader.py (YAML, overrides, validation). Everything is re-exported here, so
`from posttrain.config import X` works for any of them.
"""

from posttrain.ranges import (  # noqa: F401
    Bounds, LossAggregation, NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt, Probability,
    RunName, RunNameRule, Share,
)
from posttrain.config.schema import (  # noqa: F401
    DataConfig, RLLoopConfig, RLRecipe, EvalRecipe, LoopConfig, LoraConfig, ModelConfig, ObjectiveConfig,
    OptimConfig, PromptsConfig, RolloutConfig, RowsConfig, SamplingConfig, ScoringConfig, SyntheticConfig,
    TinyModelConfig, TrainLoopConfig, TrainRecipe, VllmConfig,
)
from posttrain.config.schema import TeacherConfig  # noqa: F401  (teacher.source: self, OPSD)
from posttrain.config.loader import (  # noqa: F401
    _Where, _apply_override, _build, _coerce, _describe, dump_yaml, from_dict, load_recipe, parse_yaml, read_utf8,
    to_dict,
)
