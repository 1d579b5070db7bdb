"""The batched crop, resize and flip against torchvision's per-image functions."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from kinfonce.data.crop import padded_crops, resized_crops, sample_boxes


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (48, 40)])
def test_batch_crop_equals_torchvision_resized_crop_per_image(size):
    """A wrong half-pixel offset, edge clamp or flip direction shows up as a pixel difference."""
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 40)
    boxes = sample_boxes(64, 32, 40, (0.08, 1.0), (3 / 4, 4 / 3), "cpu")
    flip = torch.rand(64) < 0.5
    out = resized_crops(images, boxes, size, flip)
    assert out.shape == (64, 3, *size)
    for image, box, flipped, got in zip(images, boxes.long().tolist(), flip, out, strict=True):
        want = TF.resized_crop(image, *box, list(size), antialias=False)
        if flipped:
            want = TF.horizontal_flip(want)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_boxes_fit_and_fall_back_to_the_central_crop():
    boxes = sample_boxes(500, 30, 50, (0.08, 1.0), (3 / 4, 4 / 3), "cpu")
    top, left, height, width = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert ((top + height) <= 30).all() and ((left + width) <= 50).all()
    assert torch.equal(boxes, boxes.round())
    # no try fits (the whole area at ratio 2 or more on a square): torchvision's central crop
    fallback = sample_boxes(4, 20, 20, (1.0, 1.0), (2.0, 3.0), "cpu")
    assert fallback.tolist() == [[5.0, 0.0, 10.0, 20.0]] * 4


def test_full_image_box_is_identity():
    images = torch.rand(4, 3, 20, 20)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(4, 4)
    out = resized_crops(images, boxes, (20, 20), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_padded_crops_are_torchvisions_reflect_padded_random_crops_and_flips():
    # What the augmented linear probe used kornia for: RandomCrop(size, padding, reflect) then
    # RandomHorizontalFlip. Each output must be one of torchvision's crops of the reflection-
    # padded image, mirrored or not (a wrong pad mode, offset or flip axis matches none), and
    # every offset and both flips must occur (a crop that never moves matches the first).
    torch.manual_seed(0)
    images, padding = torch.rand(200, 3, 12, 10), 2
    out = padded_crops(images, padding)
    assert out.shape == images.shape
    seen = set()
    for image, got in zip(images, out, strict=True):
        padded = TF.pad(image, [padding], padding_mode="reflect")
        matches = [
            (top, left, flipped)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            for flipped in (False, True)
            if torch.allclose(
                got,
                (TF.horizontal_flip if flipped else lambda x: x)(
                    TF.crop(padded, top, left, 12, 10)
                ),
                atol=2e-5,
                rtol=0,
            )
        ]
        assert matches, "an output that is no reflect-padded crop of its image"
        seen.update(matches)
    assert {(t, left) for t, left, _ in seen} == {(t, left) for t in range(5) for left in range(5)}
    assert {flipped for _, _, flipped in seen} == {False, True}
