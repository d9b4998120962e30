"""Training data: record readers (parquet, llava json, region json), the training dataset, collator, length grouping."""
