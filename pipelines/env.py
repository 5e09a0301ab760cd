"""Environment every `metamorph` command wants, set (if unset) when this module is imported,
before ray or transformers are imported anywhere: no hub downloads, no usage stats."""

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)
