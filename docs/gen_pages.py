"""mkdocs-gen-files script (mkdocs.yml): writes the generated pages (policyc/docsite.py) into the site; the
Methods section's navigation is one of them (methods/SUMMARY.md, read by mkdocs-literate-nav)."""

from pathlib import Path

import mkdocs_gen_files

from policyc.docsite import site_pages

ROOT = Path(__file__).resolve().parent.parent

for page, text in site_pages(ROOT).items():
    with mkdocs_gen_files.open(page, "w") as out:
        out.write(text)
    mkdocs_gen_files.set_edit_path(page, Path("..") / "policyc" / "docsite.py")
