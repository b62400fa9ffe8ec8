"""ImageNet through TFDS (mocked, no download) and the ADM preprocessing against a PIL reference."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from xar_jax.data import config as config_lib
from xar_jax.data import imagenet, pipeline
from xar_jax.data.sources import CorruptRecordError

SIZE = 16
NUM_MOCK = 16  # the mock's first 16 images include every resize case (checked below)


def reference_preprocess(pil_image, image_size):
    """ADM's center_crop_arr followed by ToTensor and Normalize(0.5, 0.5), as the reference code
    describes it: BOX halving while the short side >= 2 * size, BICUBIC resize of the short side
    to size (sides rounded), centre crop, x / 255 then (x - 0.5) / 0.5 in float32. Returns NHWC."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    arr = arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
    tensor = arr.astype(np.float32) / np.float32(255)
    return (tensor - np.float32(0.5)) / np.float32(0.5)


def _prepared_data_dir(tmp_path, file_format="array_record"):
    """The metadata our preparation check reads (mocked TFDS itself ignores the directory)."""
    version_dir = tmp_path / "imagenet2012" / "5.1.0"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text(json.dumps({"fileFormat": file_format}))
    return str(tmp_path)


def _imagenet_cfg(data_dir, **overrides):
    cfg = config_lib.get_data_config("imagenet")
    cfg.update(dict(dict(data_dir=data_dir, image_size=SIZE), **overrides))
    return cfg


@pytest.fixture(scope="module")
def mocked_imagenet(tmp_path_factory):
    """Mocked imagenet2012 (random images of random non-square sizes) and its reference crops."""
    data_dir = _prepared_data_dir(tmp_path_factory.mktemp("tfds"))
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        source = imagenet.open_tfds_source(
            data_dir, "imagenet2012", "validation", image_decoder="tfds"
        )
        examples = [source[i] for i in range(NUM_MOCK)]
        expected = np.stack(
            [reference_preprocess(Image.fromarray(e["image"]), SIZE) for e in examples]
        )
    return data_dir, examples, expected


def test_mock_images_cover_halving_downscaling_and_upscaling(mocked_imagenet):
    _, examples, _ = mocked_imagenet
    shapes = [e["image"].shape[:2] for e in examples]
    assert any(min(s) >= 2 * SIZE for s in shapes)  # BOX halving
    assert any(SIZE <= min(s) < 2 * SIZE for s in shapes)  # BICUBIC downscale only
    assert any(min(s) < SIZE for s in shapes)  # BICUBIC upscale
    assert len(set(shapes)) > 5 and all(h != w for h, w in shapes)


def test_mock_tfds_eval_pass_matches_the_reference_crop_in_order(mocked_imagenet):
    data_dir, examples, expected = mocked_imagenet
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        batches = list(
            pipeline.make_eval_iterator(
                _imagenet_cfg(data_dir, image_decoder="tfds", eval_split="validation"),
                global_batch_size=4,
                process_index=0,
                process_count=1,
            )
        )
    assert len(batches) == NUM_MOCK // 4
    images = np.concatenate([b["images"] for b in batches])
    assert images.shape == (NUM_MOCK, SIZE, SIZE, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in batches]), [e["label"] for e in examples]
    )


def test_mock_tfds_train_epoch_is_a_shuffled_randomly_flipped_permutation(mocked_imagenet):
    data_dir, _, expected = mocked_imagenet
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        it = pipeline.make_train_iterator(
            _imagenet_cfg(data_dir, image_decoder="tfds", split="validation"),
            global_batch_size=4,
            process_index=0,
            process_count=1,
            seed=5,
        )
        images = np.concatenate([next(it)["images"] for _ in range(NUM_MOCK // 4)])
    found, flips = [], []
    for image in images:
        plain = [i for i in range(NUM_MOCK) if np.array_equal(image, expected[i])]
        mirrored = [i for i in range(NUM_MOCK) if np.array_equal(image, expected[i][:, ::-1])]
        assert len(plain) + len(mirrored) == 1
        found += plain + mirrored
        flips.append(bool(mirrored))
    assert sorted(found) == list(range(NUM_MOCK)) and found != list(range(NUM_MOCK))
    assert 0 < sum(flips) < NUM_MOCK


def _jpeg(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([(x * 255 // width), (y * 255 // height), (x + y) % 256], -1)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# Non-square JPEGs: several BOX halvings, one halving, none, upscaling, and a grayscale file.
JPEG_SIZES = [(500, 375, "RGB"), (90, 64, "RGB"), (40, 23, "RGB"), (13, 29, "RGB"), (120, 77, "L")]


def test_jpeg_bytes_are_decoded_and_cropped_exactly_like_the_reference():
    records = [
        {"image": _jpeg(w, h, mode, seed=i), "label": i}
        for i, (w, h, mode) in enumerate(JPEG_SIZES)
    ]
    cfg = _imagenet_cfg("", image_decoder="pil", image_size=32)
    batch = next(
        pipeline.make_eval_iterator(
            cfg, global_batch_size=len(records), process_index=0, process_count=1, records=records
        )
    )
    for image, record in zip(batch["images"], records, strict=True):
        reference = reference_preprocess(Image.open(io.BytesIO(record["image"])).convert("RGB"), 32)
        np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(batch["labels"], np.arange(len(records)))


@pytest.fixture(scope="module")
def prepared_imagenet(tmp_path_factory):
    """A real imagenet2012 TFDS directory (ArrayRecord shards, metadata), made without TensorFlow.

    'validation' holds JPEGs of JPEG_SIZES; 'test' holds three JPEGs, the second one truncated.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core import splits as splits_lib

    data_dir = str(tmp_path_factory.mktemp("prepared"))
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    features = builder.info.features
    os.makedirs(builder.data_dir)
    jpegs = {
        "validation": [_jpeg(w, h, mode, seed=i) for i, (w, h, mode) in enumerate(JPEG_SIZES)],
        "test": [_jpeg(64, 48, seed=0), _jpeg(64, 48, seed=1)[:200], _jpeg(64, 48, seed=2)],
    }
    split_infos = []
    for split, images in jpegs.items():
        template = naming.ShardedFileTemplate(
            data_dir=builder.data_dir,
            dataset_name="imagenet2012",
            split=split,
            filetype_suffix="array_record",
        )
        writer = ArrayRecordWriter(
            str(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1"
        )
        for label, jpeg in enumerate(images):
            example = {"image": jpeg, "label": label, "file_name": f"{label}.JPEG"}
            writer.write(features.serialize_example(features.encode_example(example)))
        writer.close()
        split_infos.append(
            splits_lib.SplitInfo(
                name=split, shard_lengths=[len(images)], num_bytes=0, filename_template=template
            )
        )
    builder.info.set_splits(splits_lib.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_dir)
    return data_dir, jpegs


def test_prepared_tfds_imagenet_is_read_without_tensorflow_like_the_reference(prepared_imagenet):
    data_dir, jpegs = prepared_imagenet
    cfg = _imagenet_cfg(data_dir, eval_split="validation", image_size=32)  # image_decoder 'pil'
    batch = next(
        pipeline.make_eval_iterator(
            cfg, global_batch_size=len(JPEG_SIZES), process_index=0, process_count=1
        )
    )
    for image, jpeg in zip(batch["images"], jpegs["validation"], strict=True):
        reference = reference_preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"), 32)
        np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(batch["labels"], np.arange(len(JPEG_SIZES)))
    assert pipeline.dataset_size(cfg, "validation") == len(JPEG_SIZES)


def test_corrupt_jpeg_in_tfds_shard_names_the_file_and_record(prepared_imagenet):
    data_dir, _ = prepared_imagenet
    cfg = _imagenet_cfg(data_dir, eval_split="test")
    with pytest.raises(
        CorruptRecordError,
        match=r"imagenet2012-test.array_record-00000-of-00001, "
        r"record 1\)",
    ):
        list(
            pipeline.make_eval_iterator(cfg, global_batch_size=3, process_index=0, process_count=1)
        )


def test_corrupt_jpeg_is_reported_with_its_index_unless_skipping_is_allowed():
    records = [{"image": _jpeg(60, 40, seed=i), "label": i} for i in range(4)]
    records[2] = {"image": records[2]["image"][:100], "label": 2}  # truncated file
    cfg = _imagenet_cfg("", image_decoder="pil")
    with pytest.raises(CorruptRecordError, match="example 2"):
        list(
            pipeline.make_eval_iterator(
                cfg, global_batch_size=4, process_index=0, process_count=1, records=records
            )
        )
    cfg.allow_corrupt_records = True
    batch = next(
        pipeline.make_eval_iterator(
            cfg, global_batch_size=4, process_index=0, process_count=1, records=records
        )
    )
    np.testing.assert_array_equal(batch["skipped_records"], [0, 0, 1, 0])
    np.testing.assert_array_equal(batch["labels"], [0, 1, 3, 3])  # record 3 stands in for 2


def test_missing_tfds_data_names_the_path_and_the_build_command(tmp_path):
    cfg = _imagenet_cfg(str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        pipeline.make_train_iterator(cfg, global_batch_size=8, process_index=0, process_count=1)
    message = str(error.value)
    assert str(tmp_path / "imagenet2012") in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message
    assert str(tmp_path / "downloads" / "manual") in message


def test_tfrecord_preparation_is_rejected_with_the_array_record_command(tmp_path):
    cfg = _imagenet_cfg(_prepared_data_dir(tmp_path, file_format="tfrecord"))
    with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
        pipeline.make_train_iterator(cfg, global_batch_size=8, process_index=0, process_count=1)


def test_one_adm_crop_serves_training_and_fid_and_converts_to_rgb():
    from xar_jax.evaluation import image_sources

    assert image_sources.adm_center_crop is imagenet.adm_center_crop
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    for image in (rgb, rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("L")):
        crop = imagenet.adm_center_crop(image, SIZE)
        expected = reference_preprocess(image.convert("RGB"), SIZE)
        assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8, image.mode
        np.testing.assert_array_equal(imagenet.to_unit_range(crop), expected, err_msg=image.mode)
