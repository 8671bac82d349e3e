"""The worker's view of an SQS queue: the same lease/renew/release/delete calls as `FileQueue`.

SQS already counts attempts (`ApproximateReceiveCount`) and names a message for good
(`MessageId`, used as the task id in the failure ledger); the receipt handle of the current
receive plays the role of the lease file name: renewing with a handle that is no longer current
fails, which is how a worker learns that its lease was lost.

Not exercised by the test suite (no SQS here); the file queue is the tested path.
"""

from __future__ import annotations

from exaconnect.services.file_queue import Lease


class SQSQueue:
    def __init__(self, taskqueue) -> None:
        self.tq = taskqueue
        self.api = taskqueue.api
        self.sqs, self.url = self.api.sqs, self.api.qurl

    def after_fork(self) -> None:
        """A fresh client for the lease keeper: an HTTP connection must not be shared by two processes."""
        import boto3

        self.sqs = boto3.client("sqs", region_name=self.sqs.meta.region_name)

    def lease(self, seconds: int) -> Lease | None:
        resp = self.sqs.receive_message(QueueUrl=self.url, AttributeNames=["ApproximateReceiveCount"],
                                        MaxNumberOfMessages=1, VisibilityTimeout=int(seconds), WaitTimeSeconds=5)
        messages = resp.get("Messages") or []
        if not messages:
            return None
        msg = messages[0]
        attempts = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        return Lease(-1, msg["ReceiptHandle"], msg["MessageId"], attempts, msg["Body"])

    def _visibility(self, lease: Lease, seconds: int) -> Lease | None:
        import botocore.exceptions

        try:
            self.sqs.change_message_visibility(QueueUrl=self.url, ReceiptHandle=lease.name, VisibilityTimeout=int(seconds))
        except botocore.exceptions.ClientError:
            return None  # ReceiptHandleIsInvalid / MessageNotInflight: another receive owns it now
        return lease

    def renew(self, lease: Lease, seconds: int) -> Lease | None:
        return self._visibility(lease, seconds)

    def release(self, lease: Lease, delay_seconds: int = 0, refund: bool = False) -> Lease | None:
        return self._visibility(lease, delay_seconds)  # SQS cannot give a receive back

    def delete(self, lease: Lease, tally: bool = True) -> bool:
        self.api.delete(lease.name)
        return True

    def is_empty(self) -> bool:
        return int(self.tq.enqueued) == 0
