"""The report's face-crop section (data.crop face): how many images of each split the crop stage
cropped to a face and how many it kept whole (crop_report.csv), with a few crops and a few of the
images kept whole. With data.crop none the crop report is empty and the page has no such section.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

import pandas as pd

from clipcore.report.charts import escape

SHOWN = 8                 # crops shown, and at most half as many images kept whole


def crop_section(report: Path, crops: Path,
                 thumbnails: Callable[[dict[str, Path]], Callable[[str], str]]) -> str:
    """The section's HTML, or "" where no image was cropped (data.crop none). `thumbnails` makes
    the page's data-URI thumbnailer over {name: path}."""
    table = pd.read_csv(report, dtype={"path": str}) if Path(report).is_file() else pd.DataFrame()
    if table.empty:
        return ""
    counts = table.groupby("split", sort=False)["face"].agg(["sum", "count"])
    rows = "".join(f"<tr><td>{escape(split)}</td><td>{int(row['sum'])}</td>"
                   f"<td>{int(row['count'] - row['sum'])}</td></tr>"
                   for split, row in counts.iterrows())
    faces = table[table["face"] == 1]["path"].head(SHOWN).tolist()
    whole = table[table["face"] == 0]["path"].head(SHOWN // 2).tolist()
    shown = {PurePosixPath(p).as_posix(): Path(crops) / p for p in faces + whole}
    thumbnail = thumbnails(shown)
    tiles = "".join(f"<img class=\"tile\" src=\"{thumbnail(p)}\" title=\"{escape(p)}\" "
                    f"alt=\"{escape(p)}\">" for p in faces)
    kept = "".join(f"<img class=\"tile wrong\" src=\"{thumbnail(p)}\" title=\"{escape(p)}\" "
                   f"alt=\"{escape(p)}\">" for p in whole)
    return (f"<h2 id=\"crops\">Face crops</h2>\n<p>CLIP saw each image's largest face "
            f"(<code>data.crop: face</code>); an image with no face kept whole, listed in "
            f"<code>data/cropped/crop_report.csv</code>.</p><table><tr><th>split</th>"
            f"<th>face crops</th><th>kept whole</th></tr>{rows}</table>"
            f"<p>Crops:</p><div>{tiles}</div>"
            + (f"<p>Kept whole (no face found):</p><div>{kept}</div>" if whole else ""))
