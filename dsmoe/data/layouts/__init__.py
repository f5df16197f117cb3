"""Readers of the raw layouts of the image-text and video-text benchmarks.

Each reader turns a dataset release into :class:`dsmoe.data.raw_formats.RawRecord` s (one per image or video,
captions keyed by language, the dataset's own image/video id) plus the list of files read and notes, without
dropping anything: faults of single records (missing files, blank captions, duplicates, unknown splits) are left
for the shard writer to report; a file that is not what the layout expects raises
:class:`~dsmoe.data.raw_formats.RawFormatError` naming the file and what was expected.

* :mod:`~dsmoe.data.layouts.multi30k` - Multi30K task 1 / task 2 over the Flickr30K images.
* :mod:`~dsmoe.data.layouts.coco` - MSCOCO with Karpathy's split, STAIR Captions (ja) and COCO-CN (zh).
* :mod:`~dsmoe.data.layouts.msrvtt` - MSR-VTT videos, official split or 1k-A, MSR-VTT-CN (zh).
* :mod:`~dsmoe.data.layouts.generic` - JSON lines, and Hugging Face ``datasets`` datasets.
* :mod:`~dsmoe.data.layouts.captions` - caption files merged into samples: machine translations (MLA/DASD
  JSON, NRCCR ``cap_id caption`` lines, CCLM JSON records) and COCO-format caption files.

The module docstrings state what each reader assumes about the release where a detail could not be verified.
"""
