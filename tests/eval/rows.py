"""Rows of the demo VQA test file, as `dimoe data synth` writes them, for the eval tests."""


def vqa_row(row_id: str, image: str, question: str, answer: str, question_type: str) -> dict[str, str]:
    return {
        "id": row_id,
        "image": image,
        "question": question,
        "answer": answer,
        "question_type": question_type,
    }
