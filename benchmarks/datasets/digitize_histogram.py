#!/usr/bin/env python3
"""Sample counts read back from a matplotlib histogram saved as a PNG (standard library only).

Written for ``alpaca_cleaned_prompt_lengths.png`` (README.md in this folder): gururise/AlpacaDataCleaned's
"Distribution of prompt lengths" of the cleaned Alpaca data, the only per-sample length distribution of that data
reachable from the build machine. How the figure is read:

- the axes frame is the two dark columns and rows that run along most of the image;
- tick marks are the dark pixels just outside the frame (below it for x, left of it for y), at multiples of the
  given tick steps from 0; a least-squares line through their pixel centres maps pixels to values;
- matplotlib pads the x limits by ``axes.xmargin`` = 5% of the data range on each side (``hist`` sets no sticky x
  edges), so the frame's x limits give the data's smallest and largest value: ``lo = x0 + 0.05 r``, ``hi = x1 - 0.05
  r`` with ``r = (x1 - x0) / 1.1``; the bars are ``bins`` equal bins between them (``numpy.histogram``);
- a bar's height is its columns' count of bar-coloured pixels (the fill colour blended against white, summed
  along the column), converted with the y ticks' scale. Bars are drawn snapped to whole pixels, so each count is
  known to half a pixel (printed), and a bin under half a pixel draws nothing.

The CSV (``tokens,samples``, as ``vramcalc --sample-lengths`` reads it) spreads each bin's count evenly over the
whole token counts inside the bin, and puts one sample at the largest value (which the x limits prove exists)
whether or not its bin drew a bar. Bins that drew nothing are left empty: their samples are unknown, and the
script prints how many the drawn bars miss against ``--expected-total``.

Usage:
    python benchmarks/datasets/digitize_histogram.py benchmarks/datasets/alpaca_cleaned_prompt_lengths.png \\
        --x-tick-step 200 --y-tick-step 1000 --bins 100 --expected-total 51760 \\
        --out benchmarks/datasets/alpaca_cleaned_lengths_digitized.csv
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import zlib

BAR_RGB = (31, 119, 180)  # matplotlib's default first colour, C0 = #1f77b4
DARK = 200  # darkness (255 - mean channel) of the frame and tick pixels
X_MARGIN = 0.05  # matplotlib rcParams["axes.xmargin"]


def read_png(path: str) -> list[list[tuple[int, int, int]]]:
    """The RGB rows of an 8-bit, non-interlaced RGB or RGBA PNG (alpha dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"error: {path} is not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise SystemExit(f"error: {path}: only 8-bit RGB/RGBA non-interlaced PNGs are read")
    bpp = 4 if colour == 6 else 3
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(width)])
        previous = line
    return rows


def darkness(rgb) -> float:
    return 255 - sum(rgb) / 3


def bar_share(rgb) -> float:
    """How much of a pixel is bar colour: its distance from white along the white -> bar colour line, in [0, 1]."""
    direction = [255 - c for c in BAR_RGB]
    along = sum((255 - v) * d for v, d in zip(rgb, direction)) / sum(d * d for d in direction)
    return min(1.0, max(0.0, along))


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares value = slope * pixel + offset."""
    n = len(points)
    mean_p = sum(p for p, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    slope = sum((p - mean_p) * (v - mean_v) for p, v in points) / sum((p - mean_p) ** 2 for p, _ in points)
    return slope, mean_v - slope * mean_p


def digitize(path: str, x_tick_step: float, y_tick_step: float, bins: int) -> dict:
    img = read_png(path)
    height, width = len(img), len(img[0])
    col_dark = [sum(darkness(img[y][x]) > DARK for y in range(height)) for x in range(width)]
    row_dark = [sum(darkness(img[y][x]) > DARK for x in range(width)) for y in range(height)]
    frame_x = [x for x in range(width) if col_dark[x] > 0.6 * height]
    frame_y = [y for y in range(height) if row_dark[y] > 0.6 * width]
    if len(frame_x) != 2 or len(frame_y) != 2:
        raise SystemExit(f"error: no single axes frame found (columns {frame_x}, rows {frame_y})")
    (left, right), (top, bottom) = frame_x, frame_y
    x_ticks = [x for x in range(left + 2, right - 1) if darkness(img[bottom + 3][x]) > DARK]
    y_ticks = [y for y in range(top + 2, bottom + 1) if darkness(img[y][left - 3]) > DARK]
    x_slope, x_offset = fit_line([(x + 0.5, i * x_tick_step) for i, x in enumerate(x_ticks)])
    y_slope, y_offset = fit_line([(y + 0.5, i * y_tick_step) for i, y in enumerate(reversed(y_ticks))])
    x_lo, x_hi = x_slope * (left + 0.5) + x_offset, x_slope * (right + 0.5) + x_offset
    data_range = (x_hi - x_lo) / (1 + 2 * X_MARGIN)
    smallest, largest = round(x_lo + X_MARGIN * data_range), round(x_hi - X_MARGIN * data_range)
    samples_per_pixel = -y_slope
    background = [sum(bar_share(img[y][x]) for y in range(top + 1, bottom)) for x in range(left + 3, left + 10)]
    column_px = [round(sum(bar_share(img[y][x]) for y in range(top + 1, bottom)) - sum(background) / len(background))
                 for x in range(width)]
    occluded = {x for x in range(left + 1, right) if sum(img[y][x][0] > 200 and img[y][x][1] < 80
                                                         for y in range(top, bottom)) > (bottom - top) // 4}
    occluded |= {x + d for x in occluded for d in (-1, 1)}  # a line's antialiased edges
    pixel_of = lambda value: (value - x_offset) / x_slope - 0.5  # noqa: E731  (the pixel column holding a value)
    counts, bin_edges = [], [smallest + (largest - smallest) * k / bins for k in range(bins + 1)]
    for k in range(bins):
        first, last = math.ceil(pixel_of(bin_edges[k]) + 0.01), math.floor(pixel_of(bin_edges[k + 1]) - 0.01)
        columns = [x for x in range(first, last + 1) if x not in occluded]
        centre = (pixel_of(bin_edges[k]) + pixel_of(bin_edges[k + 1])) / 2
        # the most common height among the bin's columns (an edge column may show the neighbour's bar); on a tie,
        # the height of the column nearest the bin's centre
        best = max(columns, key=lambda x: (sum(column_px[c] == column_px[x] for c in columns), -abs(x - centre)),
                   default=None)
        counts.append((column_px[best] if best is not None else 0) * samples_per_pixel)
    return dict(frame=(left, right, top, bottom), x_ticks=x_ticks, y_ticks=y_ticks, tokens_per_px=x_slope,
                samples_per_px=samples_per_pixel, x_fit=(x_slope, x_offset), y_fit=(y_slope, y_offset),
                smallest=smallest, largest=largest, edges=bin_edges, counts=counts, column_px=column_px,
                occluded=sorted(occluded))


def histogram_rows(result: dict) -> dict[int, int]:
    """tokens -> samples: each bin's count spread evenly over its whole token counts, one sample at the largest."""
    rows: dict[int, int] = {}
    edges, counts = result["edges"], result["counts"]
    for k, count in enumerate(counts):
        n = round(count)
        last_bin = k == len(counts) - 1
        values = [t for t in range(math.ceil(edges[k]), math.floor(edges[k + 1]) + 1)
                  if t < edges[k + 1] or last_bin]
        for i, tokens in enumerate(values):
            share = n // len(values) + (1 if i < n % len(values) else 0)
            if share:
                rows[tokens] = rows.get(tokens, 0) + share
    if not rows.get(result["largest"]):
        rows[result["largest"]] = 1
    return dict(sorted(rows.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("png")
    parser.add_argument("--x-tick-step", type=float, required=True)
    parser.add_argument("--y-tick-step", type=float, required=True)
    parser.add_argument("--bins", type=int, required=True)
    parser.add_argument("--expected-total", type=int, help="the dataset's sample count, to report what is missing")
    parser.add_argument("--out", help="the tokens,samples CSV to write")
    args = parser.parse_args(argv)
    result = digitize(args.png, args.x_tick_step, args.y_tick_step, args.bins)
    rows = histogram_rows(result)
    total = sum(rows.values())
    left, right, top, bottom = result["frame"]
    print(f"frame: columns {left}-{right}, rows {top}-{bottom}; x ticks at {result['x_ticks']}, y ticks at "
          f"{result['y_ticks']}")
    print(f"scale: {result['tokens_per_px']:.4f} tokens/px, {result['samples_per_px']:.3f} samples/px "
          f"(a count is known to +-{result['samples_per_px'] / 2:.1f}); columns under another line: "
          f"{result['occluded']}")
    print(f"data range from the x limits: {result['smallest']} .. {result['largest']} tokens, "
          f"{args.bins} bins of {(result['largest'] - result['smallest']) / args.bins:.2f}")
    drawn = [k for k, c in enumerate(result["counts"]) if c > 0]
    print(f"bins with a bar: {len(drawn)} (the last ends at {result['edges'][drawn[-1] + 1]:.0f} tokens); samples "
          f"read: {total}")
    if args.expected_total:
        print(f"against {args.expected_total}: {total - args.expected_total:+d} "
              f"({(total - args.expected_total) / args.expected_total:+.2%}), the undrawn bins' samples included")
    for cap in (512, 1024, 2048):
        print(f"samples over {cap} tokens: {sum(n for t, n in rows.items() if t > cap)}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            f.write("tokens,samples\n")
            f.writelines(f"{t},{n}\n" for t, n in rows.items())
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
