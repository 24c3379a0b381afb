import numpy
import torch

from shakespeare_gpt.pictures import attention_image, axis_label, char_kind, char_name


def test_invisible_characters_are_spelt_out_and_kinds_named():
    assert [char_name(c) for c in "\n \ta,\xa0"] == ["newline", "space", "tab", "a", ",", "U+00A0"]
    assert [char_kind(c) for c in "aBe\nE3?"] == [
        "vowel", "capital consonant", "vowel", "whitespace", "capital vowel", "digit", "punctuation"
    ]  # fmt: skip
    assert axis_label("\n") == "\\n" and axis_label(" ") == "·"


def test_an_attention_image_draws_each_weight_white_at_zero_and_darkest_at_one():
    T = 4
    maps = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # uniform over the keys a query sees
    maps = torch.stack([maps, torch.eye(T)])[None]  # (1 layer, 2 heads, T, T)
    image = numpy.asarray(attention_image(maps, list("ab\nc"), "step 7"))
    cell, margin, wide = 12, 24, image.shape[1] // 2  # as attention_image lays out a 4-token prompt

    def pixel(head: int, row: int, col: int) -> list[int]:
        return image[16 + 14 + margin + row * cell + cell // 2, head * wide + margin + col * cell + cell // 2].tolist()

    white, darkest = [255, 255, 255], [40, 85, 180]
    for head in range(2):
        assert pixel(head, 0, 3) == pixel(head, 1, 2) == white  # above the diagonal: weight 0
        assert pixel(head, 0, 0) == darkest  # query 0 sees only key 0: weight 1
    assert pixel(0, 3, 0) == pixel(0, 3, 3) != white  # uniform weights, one colour
    assert pixel(1, 3, 0) == white and pixel(1, 3, 3) == darkest
