"""A1111's img2img colour correction (its `img2img_color_correction` option, "Apply color correction to img2img
results to match original colors"), in numpy, without OpenCV, scikit-image or blendmodes.

A1111 (modules/processing.py) keeps the LAB pixels of each init image as the model gets it (`setup_color_correction`:
after the resize, the "only masked" crop and the inpainting fill), and turns each result into: the result's LAB
channels histogram-matched to those (skimage's `match_histograms`), back to RGB, then that picture's hue and
saturation with the result's luminosity (blendmodes' LUMINOSITY blend, the corrected picture as the background);
before the inpainting overlay is laid back (`apply_correction`).

The three steps are restated from the libraries A1111 runs, to their integer results:
- OpenCV's 8-bit `COLOR_RGB2LAB` / `COLOR_LAB2RGB` (imgproc/src/color_lab.cpp: `RGB2Lab_b`, `Lab2RGBinteger`): its
  fixed-point arithmetic over lookup tables (sRGB gamma, the cube root, L to Y), built here as OpenCV builds them
  (float32 steps where it uses its 32-bit softfloat, round half to even); L scaled to 0..255 (L * 255 / 100),
  a and b offset by 128.
- skimage's `match_histograms(..., channel_axis=2)` on those uint8 channels: each source value's quantile
  interpolated among the reference's values, truncated back into the uint8 array it fills.
- blendmodes 2022's `blendLayers(..., BlendType.LUMINOSITY)` (the version A1111 pins): the W3C SetLum of the
  background to the foreground's luminosity (0.299 R + 0.587 G + 0.114 B) with its clip to [0, 1], truncated to 8 bits.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

# OpenCV's sRGB <-> XYZ matrices and D65 white point (color_lab.cpp's sRGB2XYZ_D65, XYZ2sRGB_D65, D65)
RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                    [0.019334, 0.119193, 0.950227]])
XYZ2RGB = np.array([[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556],
                    [0.055648, -0.204043, 1.057311]])
WHITE = np.array([0.950456, 1.0, 1.088754])

XYZ_SHIFT = 12  # OpenCV's lab_shift (xyz_shift): the matrices' fixed-point bits
GAMMA_SHIFT = 3  # extra bits of the linear-light values
LAB_SHIFT2 = XYZ_SHIFT + GAMMA_SHIFT
INV_GAMMA_SIZE = 1 << 12  # entries of the linear -> sRGB table
CBRT_SIZE = 256 * 3 // 2 * (1 << GAMMA_SHIFT)  # entries of the cube-root table
LUT_BASE = 1 << 14  # Lab2RGBinteger's fixed point
MIN_AB = -8145  # the smallest index of its a / b -> X / Z table
RGB_SHIFT = XYZ_SHIFT + 14 - 12  # Lab2RGBinteger's shift of the XYZ -> RGB product
LUMA = (0.299, 0.587, 0.114)  # blendmodes' luminosity weights

_f32 = np.float32


def _round_even(v) -> np.ndarray:
    """OpenCV's cvRound of a softfloat / softdouble: to the nearest integer, halves to even (numpy's rint)."""
    return np.rint(np.asarray(v, dtype=np.float64)).astype(np.int64)


def _descale(v: np.ndarray, shift: int) -> np.ndarray:
    """OpenCV's CV_DESCALE: v / 2**shift, rounded (half up), by an arithmetic shift."""
    return (v + (1 << (shift - 1))) >> shift


def _c_div(a: np.ndarray, b: int) -> np.ndarray:
    """C's integer division (truncated toward zero) of an int64 array by a positive int."""
    return np.sign(a) * (np.abs(a) // b)


def _gamma(x: np.ndarray) -> np.ndarray:
    """OpenCV's applyGamma (sRGB -> linear) of float32 values, in double, returned as float32."""
    xd = x.astype(np.float64)
    lo = xd / (323 / 25)
    hi = ((xd + 11 / 200) / (1 + 11 / 200)) ** (12 / 5)
    return np.where(xd <= 809 / 20000, lo, hi).astype(_f32)


# OpenCV's softfloat cube root (Turkowski's quartic rational approximation on [1/8, 1), in double)
CBRT_NUM = (45.2548339756803022511987494, 192.2798368355061050458134625, 119.1654824285581628956914143,
            13.43250139086239872172837314, 0.1636161226585754240958355063)
CBRT_DEN = (14.80884093219134573786480845, 151.9714051044435648658557668, 168.5254414101568283957668343,
            33.9905941350215598754191872, 1.0)


def _cbrt(x: np.ndarray) -> np.ndarray:
    """OpenCV's f32_cbrt of positive float32 values: the mantissa scaled into [1/8, 1) by a power 2**(3k), the
    rational approximation evaluated in double, and its top 23 mantissa bits kept unrounded (OpenCV truncates, so
    this is not numpy's cbrt rounded to float32)."""
    bits = x.astype(_f32).view(np.uint32).astype(np.int64)
    e = (bits >> 23) - 127
    r = np.fmod(e, 3)
    r = np.where(r >= 0, r - 3, r)  # (C's remainder, then into -3..-1)
    fr = (((r + 1023) << 52) | ((bits & 0x7FFFFF) << 29)).view(np.float64)
    num, den = np.zeros_like(fr), np.zeros_like(fr)
    for a, b in zip(CBRT_NUM, CBRT_DEN):  # (Horner: ((a1 * fr + a2) * fr + ...) + a5, one rounding per step)
        num, den = num * fr + a, den * fr + b
    mantissa = ((num / den).view(np.int64) & ((1 << 52) - 1)) >> 29
    out = (((e - r) // 3 - 1 + 127) << 23 | mantissa).astype(np.uint32).view(_f32)
    return np.where(bits == 0, _f32(0), out)


def _inv_gamma(x: np.ndarray) -> np.ndarray:
    """OpenCV's applyInvGamma (linear -> sRGB) of float32 values, in double, returned as float32."""
    xd = x.astype(np.float64)
    lo = xd * (323 / 25)
    hi = xd ** (1 / (12 / 5)) * (1 + 11 / 200) - 11 / 200
    return np.where(xd <= 7827 / 2500000, lo, hi).astype(_f32)


@functools.lru_cache(maxsize=1)
def _tables() -> dict:
    """OpenCV's 8-bit Lab tables (initLabTabs) and fixed-point matrices, built once."""
    i = np.arange(256)
    gamma = _round_even(_f32(255 * (1 << GAMMA_SHIFT)) * _gamma(i.astype(_f32) / _f32(255)))
    j = np.arange(INV_GAMMA_SIZE)
    inv_gamma = _round_even(_f32(255) * _inv_gamma(_f32(1) / _f32(INV_GAMMA_SIZE) * j.astype(_f32)))
    x = (_f32(1) / _f32(255 * (1 << GAMMA_SHIFT))) * np.arange(CBRT_SIZE).astype(_f32)
    thresh, scale, bias = _f32(216) / _f32(24389), _f32(841) / _f32(108), _f32(16) / _f32(116)
    lin = (x.astype(np.float64) * np.float64(scale) + np.float64(bias)).astype(_f32)  # (its fused multiply-add)
    cbrt = _round_even(_f32(1 << LAB_SHIFT2) * np.where(x < thresh, lin, _cbrt(x)))
    to_xyz = _round_even((1 << XYZ_SHIFT) * RGB2XYZ / WHITE[:, None])
    to_rgb = _round_even((1 << XYZ_SHIFT) * XYZ2RGB * WHITE[None, :])
    return {"gamma": gamma, "inv_gamma": inv_gamma, "cbrt": cbrt, "to_xyz": to_xyz, "to_rgb": to_rgb,
            "l_to_yf": _l_to_yf(), "ab_to_xz": _ab_to_xz()}


def _l_to_yf() -> np.ndarray:
    """OpenCV's LabToYF_b: for each 8-bit L, (Y, f(Y)) in LUT_BASE fixed point, as (256, 2) int64."""
    out = np.zeros((256, 2), np.int64)
    for L in range(256):
        if L <= 20:  # the linear part of L*: Y = L / 903.3
            y = _f32(L * LUT_BASE * 20 * 9) / _f32(17 * 29 * 29 * 29)
            fy = _f32(LUT_BASE) * (_f32(16) / _f32(116) + _f32(L * 5) / _f32(3 * 17 * 29))
        else:  # f(Y) = (L + 16) / 116, Y = f(Y)^3
            fy = _f32(L * 100 * LUT_BASE) / _f32(255 * 116) + _f32(16 * LUT_BASE) / _f32(116)
            y = fy * fy * fy / _f32(LUT_BASE * LUT_BASE)
        out[L] = _round_even(y), _round_even(fy)
    return out


def _ab_to_xz() -> np.ndarray:
    """OpenCV's abToXZ_b: f^-1 in LUT_BASE fixed point (integer arithmetic, C's truncating division), indexed
    from MIN_AB."""
    i = np.arange(MIN_AB, LUT_BASE * 9 // 4 + MIN_AB, dtype=np.int64)
    linear = _c_div(i * 108, 841) - LUT_BASE * 16 // 116 * 108 // 841
    cube = (i * i // LUT_BASE) * i // LUT_BASE
    return np.where(i <= 3390, linear, cube)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB) of an (..., 3) uint8 array: uint8 L*255/100, a+128, b+128."""
    t = _tables()
    lin = t["gamma"][np.asarray(rgb, dtype=np.uint8)]
    fx, fy, fz = (t["cbrt"][_descale(lin @ t["to_xyz"][k], XYZ_SHIFT)] for k in range(3))
    L = _descale((116 * 255 + 50) // 100 * fy - (16 * 255 * (1 << LAB_SHIFT2) + 50) // 100, LAB_SHIFT2)
    a = _descale(500 * (fx - fy) + (128 << LAB_SHIFT2), LAB_SHIFT2)
    b = _descale(200 * (fy - fz) + (128 << LAB_SHIFT2), LAB_SHIFT2)
    return np.clip(np.stack([L, a, b], axis=-1), 0, 255).astype(np.uint8)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """OpenCV's cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) of an (..., 3) uint8 array (8-bit LAB as `rgb_to_lab`'s)."""
    t = _tables()
    lab = np.asarray(lab, dtype=np.uint8).astype(np.int64)
    y, ify = t["l_to_yf"][lab[..., 0], 0], t["l_to_yf"][lab[..., 0], 1]
    adiv = ((5 * lab[..., 1] * 53687 + (1 << 7)) >> 13) - 128 * LUT_BASE // 500
    bdiv = ((lab[..., 2] * 41943 + (1 << 4)) >> 9) - 128 * LUT_BASE // 200 + 1
    x, z = t["ab_to_xz"][ify + adiv - MIN_AB], t["ab_to_xz"][ify - bdiv - MIN_AB]
    xyz = np.stack([x, y, z], axis=-1)
    linear = np.clip(_descale(xyz @ t["to_rgb"].T, RGB_SHIFT), 0, INV_GAMMA_SIZE - 1)
    return np.clip(t["inv_gamma"][linear], 0, 255).astype(np.uint8)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """skimage's exposure.match_histograms(image, reference, channel_axis=-1) of (..., C) uint8 arrays (of any two
    sizes): each channel's values moved to the reference channel's values at the same quantile, as uint8 (the
    interpolated values truncated, as skimage's uint8 result array takes them)."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        out[..., c] = _match_channel(image[..., c], reference[..., c])
    return out


def _match_channel(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """One channel of `match_histograms`: the source's cumulative quantile of each value, interpolated (linearly)
    over the reference's distinct values and their cumulative quantiles."""
    src_counts = np.bincount(source.ravel(), minlength=256)
    ref_counts = np.bincount(reference.ravel(), minlength=256)
    ref_values = np.nonzero(ref_counts)[0]
    src_quantiles = np.cumsum(src_counts) / source.size
    ref_quantiles = np.cumsum(ref_counts[ref_values]) / reference.size
    mapped = np.interp(src_quantiles, ref_quantiles, ref_values)
    return mapped.astype(np.uint8)[source]


def _lum(c: np.ndarray) -> np.ndarray:
    return c[..., 0] * LUMA[0] + c[..., 1] * LUMA[1] + c[..., 2] * LUMA[2]


def set_luminosity(colours: np.ndarray, lum: np.ndarray) -> np.ndarray:
    """blendmodes' _setLum (the W3C SetLum + ClipColor) of float RGB in [0, 1]: `colours` shifted to luminosity
    `lum`, then pulled toward their luminosity where a channel left [0, 1]: first below 0, then above 1 (the maximum
    taken before the first pull, as blendmodes takes it)."""
    c = colours + (lum - _lum(colours))[..., None]
    lum, lo, hi = _lum(c), c.min(axis=-1), c.max(axis=-1)
    low, high = lo < 0, hi > 1
    lm = lum[low][:, None]
    c[low] = lm + (c[low] - lm) * lm / (lm - lo[low][:, None])
    lm = lum[high][:, None]
    c[high] = lm + (c[high] - lm) * (1 - lm) / (hi[high][:, None] - lm)
    return c


def luminosity_blend(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes 2022's blendLayers(background, foreground, BlendType.LUMINOSITY) of opaque (..., 3) uint8 RGB
    arrays, as uint8: the background's hue and saturation at the foreground's luminosity, clipped to [0, 1] and
    truncated to 8 bits (its imageFloatToInt)."""
    blended = set_luminosity(background / 255, _lum(foreground / 255))
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


def correction_target(image: Image.Image) -> np.ndarray:
    """A1111's setup_color_correction: the LAB pixels (OpenCV's 8-bit LAB) of an init image as the model gets it."""
    return rgb_to_lab(np.asarray(image.convert("RGB")))


def apply_correction(target: np.ndarray, image: Image.Image) -> Image.Image:
    """A1111's apply_color_correction: `image` (a result) with its LAB histograms matched to `target`'s
    (`correction_target`), back to RGB, then blended LUMINOSITY under the result (the result's luminosity, the
    corrected colours). The result's other PIL info is not carried over (A1111 makes a new image too)."""
    rgb = np.asarray(image.convert("RGB"))
    corrected = lab_to_rgb(match_histograms(rgb_to_lab(rgb), target))
    return Image.fromarray(luminosity_blend(corrected, rgb))
