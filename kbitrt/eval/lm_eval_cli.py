"""lm-eval's own CLI with the `kbit` model registered:

    python -m kbitrt.eval.lm_eval_cli run --model kbit --model_args pretrained=DIR --tasks piqa

(lm-eval 0.4.13 has no plugin discovery, so `lm_eval --model kbit` alone cannot see kbitrt.)"""

import kbitrt.eval.lm_eval_model  # noqa: F401  (registers "kbit")
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
