"""DVC stage ``demo``: generate the synthetic demo data set in ImageNet's folder layout.

When ``data.source`` is ``folder`` the stage writes only a marker saying so: the demo stage stays
in the DAG (DVC stages are not conditional) but costs nothing at full scale.
"""

from __future__ import annotations

import json
import shutil

from pipeline.config import DEMO_DIR
from pipeline.paths import repo_root
from stages import _cli

PARAMS = ["data.source", "data.demo"]


def main() -> None:
    args = _cli.parser(__doc__.splitlines()[0]).parse_args()
    cfg = _cli.config(args.params)
    out = repo_root() / DEMO_DIR
    if cfg.data.source != "demo":
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "SKIPPED.json").write_text(
            json.dumps({"reason": f"data.source is {cfg.data.source!r}"}) + "\n"
        )
        return
    from pipeline.demo_data import generate_demo

    d = cfg.data.demo
    generate_demo(
        out,
        num_classes=d.num_classes,
        train_per_class=d.train_per_class,
        val_per_class=d.val_per_class,
        image_size=d.image_size,
        seed=d.seed,
    )


if __name__ == "__main__":
    _cli.run(main, ValueError, OSError)
