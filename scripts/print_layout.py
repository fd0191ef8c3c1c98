"""Print the packed slot layout tables of docs/LAYOUT.md, derived from `VecFormat.fields`.

Run `python scripts/print_layout.py > /tmp/layout.md` and paste the output into docs/LAYOUT.md, so
the document can never drift from the codec.
"""
from tq_kernels.codec import VecFormat

FORMATS = [
    ("K4 / V4 (turbo4), d=128", VecFormat(128, 4)),
    ("K3 / V3 (turbo3), d=128", VecFormat(128, 3)),
    ("K2 / V2 (turbo2), d=128", VecFormat(128, 2)),
    ("PROD3 keys (prod3: 2-bit MSE + QJL), d=128", VecFormat(128, 3, qjl=True)),
    ("3.5-style outliers (turbo3.5: 3 bits + 32 channels at 4 bits), d=128",
     VecFormat(128, 3, outlier_channels=32, outlier_bits=4)),
    ("K5 keys (k5v4), d=128", VecFormat(128, 5)),
    ("K4 / V4, d=64", VecFormat(64, 4)),
]

FIELD_MEANING = {
    "main": "{bits} of the code of every coordinate",
    "qjl": "QJL sign of every projection (1 = positive)",
    "extra": "{bits} of the code at the outlier positions 0, {r}, {r2}, ...",
}


def table(fmt: VecFormat) -> str:
    lines = ["| field | width (bits) | coords | byte offset | bytes | meaning |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for kind, width, n, offset, shift in fmt.fields:
        bits = f"bit {shift}" if width == 1 else f"bits {shift}..{shift + width - 1}"
        meaning = FIELD_MEANING[kind].format(bits=bits, r=fmt.outlier_stride, r2=2 * fmt.outlier_stride)
        lines.append(f"| {kind} | {width} | {n} | {offset} | {n * width // 8} | {meaning} |")
    scales = "norm scale" + (", QJL scale" if fmt.qjl else "")
    lines.append(f"| scales | 16 (fp16) x {fmt.n_scales} | - | - (scales tensor) | {2 * fmt.n_scales} | {scales} |")
    return "\n".join(lines)


def main() -> None:
    for title, fmt in FORMATS:
        print(f"### {title}: `{fmt.describe()}`\n")
        print(f"code_bytes = {fmt.code_bytes}, n_scales = {fmt.n_scales}, slot_bytes = {fmt.slot_bytes} "
              f"(bf16: {2 * fmt.head_dim}, {2 * fmt.head_dim / fmt.slot_bytes:.2f}x), "
              f"{fmt.avg_bits:.2f} code bits per coordinate\n")
        print(table(fmt))
        print()


if __name__ == "__main__":
    main()
