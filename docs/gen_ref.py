"""Generate the API reference at build time (mkdocs-gen-files): one page per module of ``src/tucker_attention``.

The package tree is walked anew on every build, so modules that move, appear or disappear need no edit here. Private
modules (``_*.py``) and ``__main__`` are skipped; a package's page is its ``__init__``. The pages hold only
``::: module`` blocks; mkdocstrings reads the source with griffe (static analysis), nothing is imported.
``reference/SUMMARY.md`` is the section's navigation (mkdocs-literate-nav).
"""

from pathlib import Path

import mkdocs_gen_files

root = Path(__file__).parent.parent
src = root / "src"
nav = mkdocs_gen_files.Nav()

for path in sorted((src / "tucker_attention").rglob("*.py")):
    module_path = path.relative_to(src).with_suffix("")
    parts = tuple(module_path.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        doc_path = Path(*parts, "index.md")
    elif parts[-1] == "__main__":
        continue
    else:
        doc_path = module_path.with_suffix(".md")
    if any(part.startswith("_") for part in parts):
        continue
    if not (path.parent / "__init__.py").exists():  # a stray file outside the package tree
        continue
    nav[parts] = doc_path.as_posix()
    with mkdocs_gen_files.open(Path("reference", doc_path), "w") as f:
        f.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
    f.writelines(nav.build_literate_nav())
