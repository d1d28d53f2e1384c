"""The generated files of every bundle: configs, LICENSE and docs, rendered from one shared source.

Each bundle in ``bundles/`` must stand alone (copied anywhere, run with nothing beside it) in
MONAI model-zoo shape, yet all bundles share their configs. The shared text lives once, in the
package (``fedfms/bundle_templates``); what makes a bundle a method lives in the bundle itself
(``configs/method.json``, ``configs/metadata.json``, ``docs/overview.md``). ``fedfms bundles``
renders the rest into each bundle as plain files:

- ``configs/train.json``, ``evaluate.json``, ``inference.json``: the shared definitions
  (``common.json``: method settings, network, data, preprocessing) followed by that config's own
  section, so each is complete on its own and any two still merge (the shared keys are equal);
- ``configs/cpu_demo.json``: the small profile of the same classes (the shared
  ``cpu_demo.json``, then the bundle's own ``cpu_demo`` section of ``method.json``: a foundation
  model keeps its pretrained weights there, at a size a CPU trains);
- ``LICENSE`` and ``docs/README.md`` (the zoo's sections, filled from the bundle's own files).

``fedfms bundles --check`` (and a test) proves that the bundles agree with their source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from fedfms.errors import DataError
from fedfms.io import atomic_write, load_json
from fedfms.models.factory import SAM_MODELS

TEMPLATES = Path(__file__).parent / "bundle_templates"
SHARED = "common.json"
CONFIGS = ("train.json", "evaluate.json", "inference.json")
COPIED = {"LICENSE": "LICENSE"}
PROFILE = "cpu_demo"  # the CPU demo profile: configs/cpu_demo.json, and its section in method.json
OWN_FILES = ("configs/method.json", "configs/metadata.json", "docs/overview.md")
PRETRAINED_REQUIRED = (
    "Training needs `--pretrained_checkpoint /path/to/sam_vit_b_01ec64.pth`: a local SAM\n"
    "checkpoint (the official one or MedSAM; nothing is downloaded). `--pretrained_checkpoint scratch`\n"
    "trains from random weights on purpose (the papers' \"-PT\" ablation)."
)
FROM_SCRATCH = "The network trains from random weights (`pretrained_checkpoint`: `scratch`)."
VARIANTS = (
    "Another fine-tuning strategy of the same network is one key, e.g. `--strategy pdec` (`full`, `msa`,\n"
    "`flap`, `lora`, `lora_dec`, `dec`, `pdec`, `attn`; `fedfms params --strategy pdec` counts what trains),\n"
    "and the \"-PT\" ablation (same network, random weights) is `--pretrained_checkpoint scratch`.\n"
)


INPUT_SHAPE = "_meta_#network_data_format#inputs#image#spatial_shape"  # MONAI's id of the declared input shape


def verify_checks(bundle_dir: str | os.PathLike) -> list[tuple[str, list[str], dict]]:
    """MONAI's ``verify_net_in_out`` as the bundle's docs give it: (profile, config files, overrides) per profile.

    ``metadata.json`` declares the input shape of the bundle's own configuration: ``32*n``-style
    for networks that take any multiple of a size, plain numbers for a SAM image encoder (built
    for one ``image_size``). The CPU demo profile builds smaller SAM encoders, so its check states
    that profile's size.
    """
    bundle = Path(bundle_dir)
    shape = _input_shape(bundle)
    demo_size = cpu_demo_profile(bundle)["image_size"]
    return [
        ("train.json/inference.json", ["configs/inference.json"], {}),
        (PROFILE, ["configs/inference.json", f"configs/{PROFILE}.json"], {INPUT_SHAPE: [demo_size] * len(shape)} if _fixed(shape) else {}),
    ]


def _input_shape(bundle: Path) -> list:
    """The input ``spatial_shape`` the bundle's ``metadata.json`` declares."""
    return load_json(bundle / "configs" / "metadata.json")["network_data_format"]["inputs"]["image"]["spatial_shape"]


def _fixed(shape: list) -> bool:
    """A shape of plain numbers (one input size), not ``k*n`` expressions."""
    return all(isinstance(size, int) for size in shape)


def _verify_text(bundle: Path) -> str:
    """The README's check commands and what the declared shape means."""
    shape = _input_shape(bundle)
    blocks = []
    for profile, configs, overrides in verify_checks(bundle):
        files = configs[0] if len(configs) == 1 else "\"[" + ",".join(f"'{c}'" for c in configs) + "]\""
        extra = "".join(f' \\\n    --{key} "{json.dumps(value, separators=(",", ":"))}"' for key, value in overrides.items())
        blocks.append(
            f"```bash\n# {profile}\npython -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\\n"
            f'    --config_file {files} --bundle_root "$PWD"{extra}\n```'
        )
    if _fixed(shape):
        meaning = (
            f"The network takes exactly {' x '.join(map(str, shape))} px in the bundle's configuration: a SAM image encoder is built "
            f"for one input size (`image_size`). The CPU demo profile builds it for {cpu_demo_profile(bundle)['image_size']} px, so its "
            "check states that size."
        )
    else:
        meaning = (
            f"`spatial_shape` in `metadata.json` is `{shape[0]}`: any n >= 1, in training (batch norm, deep supervision) as in "
            "inference; MONAI's check uses n = 1 unless given `--n`."
        )
    return "\n\n".join(blocks) + "\n\n" + meaning


def is_bundle(folder: Path) -> bool:
    return all((folder / name).is_file() for name in OWN_FILES)


def render_bundle(bundle_dir: str | os.PathLike) -> dict[str, str]:
    """The text of every generated file of one bundle, keyed by its path inside the bundle."""
    bundle = Path(bundle_dir)
    missing = [name for name in OWN_FILES if not (bundle / name).is_file()]
    if missing:
        raise DataError(bundle, f"not a fedfms bundle: {', '.join(missing)} missing")
    shared = load_json(TEMPLATES / SHARED)
    files = {f"configs/{name}": _json({**shared, **load_json(TEMPLATES / name)}) for name in CONFIGS}
    files[f"configs/{PROFILE}.json"] = _json(cpu_demo_profile(bundle))
    files.update({target: (TEMPLATES / source).read_text() for target, source in COPIED.items()})
    files["docs/README.md"] = _readme(bundle)
    return files


def cpu_demo_profile(bundle_dir: str | os.PathLike) -> dict:
    """The CPU demo profile of a bundle: the shared small settings, then the bundle's own (its ``cpu_demo`` section)."""
    own = load_json(Path(bundle_dir) / "configs" / "method.json").get(PROFILE, {})
    return {**load_json(TEMPLATES / f"{PROFILE}.json"), **own}


def _json(config: dict) -> str:
    return json.dumps(config, indent=4) + "\n"


def _readme(bundle: Path) -> str:
    """The zoo's README sections: the bundle's own overview, then the shared text with its names filled in."""
    metadata = load_json(bundle / "configs" / "metadata.json")
    method = load_json(bundle / "configs" / "method.json")
    fields = {
        "bundle": bundle.name,
        "title": metadata["name"],
        "overview": (bundle / "docs" / "overview.md").read_text().strip(),
        "data_source": metadata["data_source"],
        "references": "\n".join(f"- {reference}" for reference in metadata["references"]),
        "method": _table(method),
        "cpu_demo": _table(cpu_demo_profile(bundle)),
        "version": metadata["version"],
        "pretrained": PRETRAINED_REQUIRED if "pretrained_checkpoint" not in method else FROM_SCRATCH,
        "variants": VARIANTS if method["model"] in SAM_MODELS else "",
        "verify": _verify_text(bundle),
    }
    return (TEMPLATES / "README.md").read_text().format(**fields)


def _table(settings: dict) -> str:
    """Markdown rows ``| key | value |`` of a bundle's settings (the profile section is shown on its own)."""
    return "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings.items() if key != PROFILE)


def stale_files(bundle_dir: str | os.PathLike) -> list[str]:
    """Generated files of a bundle that are missing, differ from their source, or are links."""
    bundle = Path(bundle_dir)
    return sorted(
        name
        for name, text in render_bundle(bundle).items()
        if (bundle / name).is_symlink() or not (bundle / name).is_file() or (bundle / name).read_text() != text
    )


def write_bundle(bundle_dir: str | os.PathLike) -> list[str]:
    """Render a bundle's generated files into it (each written atomically); returns those that changed."""
    bundle = Path(bundle_dir)
    changed = stale_files(bundle)
    for name, text in render_bundle(bundle).items():
        if name in changed:  # the rename replaces a link itself, not its target
            atomic_write(bundle / name, lambda tmp, text=text: _write_readable(tmp, text))
    return changed


def _write_readable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)  # a temporary file starts private; bundle files are read by every participant


def find_bundles(root: str | os.PathLike, names: Sequence[str] = ()) -> list[Path]:
    """The bundles under ``root`` (all, or those ``names``)."""
    root = Path(root)
    if names:
        return [root / name for name in names]
    return sorted(folder for folder in root.iterdir() if is_bundle(folder))
