"""finance_sentiment: bearish / bullish / neutral financial news headlines, and their monitoring.

Data: Twitter Financial News Sentiment (zeroshot, MIT licence), shipped in
``data/twitter_financial_news_sentiment/``: ``train.csv`` (9,543 rows) and ``valid.csv``
(2,388 rows), columns ``text,label`` with label ids 0 bearish, 1 bullish, 2 neutral.
The published ``valid`` file is our test set; ingestion carves the validation split
(for early stopping and model choice) from train.

Why macro-F1 is the primary metric: the classes are imbalanced (train: 6,178 neutral,
1,923 bullish, 1,442 bearish), so a model that leans on "neutral" scores a fine
accuracy while missing the minority classes; macro-F1 weighs the three equally. The
costly error is a missed bearish headline, so bearish recall is reported and has a
floor of its own.

Monitoring knowledge lives here too (``monitoring``): bearish is the negative label
whose surges are alerts, and a keyword map tags macro topics that have no cashtag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domainflow.monitoring.config import MonitorConfig, SurgeRule
from domains.base import CompressionDefaults, DataSource, DomainSpec, QualityGates, TrainingDefaults, register

LABELS = ("bearish", "bullish", "neutral")
NEGATIVE_LABEL = "bearish"
#: Key of the bearish class in the ``per_class_recall`` metric (which names classes by id).
BEARISH_RECALL = f"recall_{LABELS.index(NEGATIVE_LABEL)}"

#: Macro topics for headlines without a cashtag (topic -> words or phrases, matched as whole
#: words, case-insensitively). A person extends or replaces it with ``--config``.
KEYWORDS: dict[str, list[str]] = {
    "fed": ["fed", "federal reserve", "fomc", "powell", "rate hike", "rate hikes", "rate cut", "rate cuts", "interest rates"],
    "inflation": ["inflation", "cpi", "consumer prices", "deflation"],
    "oil": ["oil", "crude", "opec", "brent", "wti"],
    "crypto": ["bitcoin", "crypto", "cryptocurrency", "ethereum", "btc"],
    "jobs": ["jobs report", "payrolls", "nonfarm", "unemployment", "jobless"],
    "china": ["china", "chinese", "beijing", "yuan"],
    "housing": ["housing", "mortgage", "mortgages", "home sales"],
    "trade": ["tariff", "tariffs", "trade war", "trade deal"],
    "banks": ["bank", "banks", "banking", "lender", "lenders"],
    "covid": ["covid", "coronavirus", "pandemic", "vaccine", "lockdown"],
}


@dataclass(frozen=True)
class FinanceSentimentSpec(DomainSpec):
    """Sentiment classification plus what monitoring needs: the negative label and topics."""

    monitoring: MonitorConfig = field(default_factory=lambda: MonitorConfig(negative_label=NEGATIVE_LABEL, keywords=KEYWORDS, surge=SurgeRule()))

    def respond(self, label: str, score: float, nearest: Any = None) -> dict[str, Any]:
        """A bearish prediction is a negative signal that monitoring counts towards surges."""
        signal = {"bearish": "negative", "bullish": "positive"}.get(label, "neutral")
        return {"signal": signal}


SPEC = register(
    FinanceSentimentSpec(
        name="finance_sentiment",
        description="Financial news headline sentiment (Twitter Financial News Sentiment: bearish / bullish / neutral).",
        source=DataSource(
            train="twitter_financial_news_sentiment/train.csv",
            test="twitter_financial_news_sentiment/valid.csv",
            hf_dataset="zeroshot/twitter-financial-news-sentiment",
            hf_test_split="validation",
            licence="MIT",
            attribution="Twitter Financial News Sentiment v1.0.0, zeroshot (2022), MIT licence.",
        ),
        text_column="text",
        label_column="label",
        label_names=LABELS,
        primary_metric="macro_f1",
        metrics=("macro_f1", "accuracy", "per_class_recall"),
        # Floors: what any served model must meet. They sit below the target of 0.87 macro-F1 / 0.90
        # accuracy, which all-MiniLM-L6-v2 with this recipe does not reach (numbers below).
        gates=QualityGates(min_metrics={"macro_f1": 0.80, "accuracy": 0.85, BEARISH_RECALL: 0.75}),
        # Class weighting: inverse-frequency loss weights, so the minority bearish class is not traded
        # for neutral (4.3x more rows). Measured on the full data (test = valid.csv): 6 epochs, batch 32,
        # encoder lr 8e-5 -> macro-F1 0.836, accuracy 0.876, bearish recall 0.790 (4 epochs: 0.829 / 0.867;
        # 4 epochs at batch 16, lr 5e-5: 0.818 / 0.861). Validation accuracy flattens after epoch 5;
        # patience 2 lets one flat epoch pass.
        training=TrainingDefaults(epochs=6.0, class_weighting=True, early_stopping_patience=2),
        # Measured on the full data: torch's dynamic int8 lost 1.2 points of macro-F1 (bearish recall
        # 0.793 -> 0.746), over the 1-point budget; ONNX Runtime's int8 (per-channel weight scales) lost
        # nothing and ran 1.77x faster. A 3-layer distilled student lost 2.2 points (2.5 with int8) and
        # cost 17 minutes of a 2-core run, so it is not built by default; add "distill" to try it again.
        compression=CompressionDefaults(methods=("onnx_int8",)),
        max_length=64,  # 99.8% of the headlines are shorter (mean 28 tokens, URLs included)
        validation_fraction=0.1,
        min_examples_per_class=5,
    )
)
