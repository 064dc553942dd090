"""The four standard benchmark releases: their files, keys, classes and splits (docs/data.md,
"Standard releases"). Rows are taken in file order: the first ``query`` rows are the query set, the
next ``train`` rows the training set, and the database is every row but the query rows."""

from __future__ import annotations

from dataclasses import dataclass

MIRFLICKR_CLASSES = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake",
    "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures",
    "sunset", "transport", "tree", "water",
)


@dataclass(frozen=True)
class Part:
    """One block of rows: the file and key of each modality."""

    img: tuple[str, str]
    txt: tuple[str, str]
    lab: tuple[str, str]


@dataclass(frozen=True)
class Release:
    name: str
    parts: tuple[Part, ...]  # concatenated in this order
    classes: int
    query: int  # the first `query` rows
    train: int  # the next `train` rows; the database is every row but the query rows
    class_names: tuple[str, ...] = ()


RELEASES = {
    "mirflickr": Release("mirflickr25k", (Part(("mirflickr25k-iall-vgg.mat", "XAll"), ("mirflickr25k-yall.mat", "YAll"),
                                               ("mirflickr25k-lall.mat", "LAll")),),
                         classes=24, query=2000, train=10000, class_names=MIRFLICKR_CLASSES),
    "nuswide": Release("nuswide21", (Part(("nus-wide-tc21-xall-vgg-clean.mat", "XAll"),
                                          ("nus-wide-tc21-yall-clean.mat", "YAll"),
                                          ("nus-wide-tc21-lall-clean.mat", "LAll")),),
                       classes=21, query=2100, train=10500),
    "coco": Release("mscoco", (Part(("MSCOCO_deep_doc2vec_data.h5py", "train_imgs_deep"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "train_text"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "train_imgs_labels")),
                               Part(("MSCOCO_deep_doc2vec_data.h5py", "test_imgs_deep"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "test_text"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "test_imgs_labels"))),
                    classes=80, query=5000, train=10000),
    "iapr": Release("iaprtc12", (Part(("iapr-tc12-rand.mat", "VDatabase"), ("iapr-tc12-rand.mat", "YDatabase"),
                                      ("iapr-tc12-rand.mat", "databaseL")),
                                 Part(("iapr-tc12-rand.mat", "VTest"), ("iapr-tc12-rand.mat", "YTest"),
                                      ("iapr-tc12-rand.mat", "testL"))),
                    classes=255, query=2000, train=10000),
}
