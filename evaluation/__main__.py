"""lm-eval's own command line with the suite's model registered.

    python -m evaluation --model llm-repro --model_args checkpoint=RUN --tasks repro_cloze \\
        --include_path evaluation/tasks [--limit 8] [--output_path OUT] [--device cpu]

Every lm-eval subcommand and flag works as with `lm_eval`; lm-eval 0.4 has no plugin entry points
for models, so the adapter must be imported before its command line parses `--model`.
"""

import sys

import evaluation.lm  # noqa: F401  registers "llm-repro"
from lm_eval.__main__ import cli_evaluate
from repro.config import ConfigError


def main() -> int:
    """lm-eval's command line; a run folder the suite refuses (a checkpoint that is not plain data, a
    missing run.json) is one line and exit code 2, not lm-eval's traceback."""
    try:
        cli_evaluate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
