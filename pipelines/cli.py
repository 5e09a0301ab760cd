"""The `metamorph` command's entry point.

    metamorph run                         # the whole pipeline, tiny preset, local Ray + MLflow
    metamorph run --preset smoke --only tokenize --force tokenize
    metamorph plan --preset smoke         # what would run, what is cached
    metamorph stages                      # every stage: inputs, outputs, config fields
    metamorph ui                          # MLflow UI on 127.0.0.1 over the run root's store
    metamorph make-checkpoints DIR        # small random HF checkpoints for --preset rehearsal

The commands themselves are ``pipelines.commands`` (typer). A `plan` or `run` seen before with
nothing changed since is answered from its remembered resolution (``pipelines.memo``) without
loading the config machinery, the CLI framework or the stage code: a repeated `plan`, and a
repeated `run` with every stage cached, read only the run root's manifests.
"""

from __future__ import annotations

import os
import sys

import pipelines.env  # noqa: F401  (environment defaults, before anything else is imported)


def main(argv: list[str] | None = None) -> None:
    from pipelines import memo

    args = list(sys.argv[1:] if argv is None else argv)
    memo.begin(args, dict(os.environ))
    if args[:1] in (["plan"], ["run"]) and "--help" not in args:
        code = memo.answer(args)
        if code is not None:
            sys.exit(code)
    from pipelines.commands import app

    app(args=args, prog_name="metamorph")


if __name__ == "__main__":  # pragma: no cover
    main()
