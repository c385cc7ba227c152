import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_STATUS_UNSPECIFIED: _ClassVar[TokenStatus]
    TOKEN_STATUS_VALID: _ClassVar[TokenStatus]
    TOKEN_STATUS_REFRESHED: _ClassVar[TokenStatus]
    TOKEN_STATUS_NO_LINK: _ClassVar[TokenStatus]
    TOKEN_STATUS_EXPIRED: _ClassVar[TokenStatus]
    TOKEN_STATUS_REAUTH_REQUIRED: _ClassVar[TokenStatus]
    TOKEN_STATUS_IDP_UNAVAILABLE: _ClassVar[TokenStatus]
    TOKEN_STATUS_STORE_UNAVAILABLE: _ClassVar[TokenStatus]
    TOKEN_STATUS_ACCOUNT_DISABLED: _ClassVar[TokenStatus]
    TOKEN_STATUS_EXCHANGE_DENIED: _ClassVar[TokenStatus]
TOKEN_STATUS_UNSPECIFIED: TokenStatus
TOKEN_STATUS_VALID: TokenStatus
TOKEN_STATUS_REFRESHED: TokenStatus
TOKEN_STATUS_NO_LINK: TokenStatus
TOKEN_STATUS_EXPIRED: TokenStatus
TOKEN_STATUS_REAUTH_REQUIRED: TokenStatus
TOKEN_STATUS_IDP_UNAVAILABLE: TokenStatus
TOKEN_STATUS_STORE_UNAVAILABLE: TokenStatus
TOKEN_STATUS_ACCOUNT_DISABLED: TokenStatus
TOKEN_STATUS_EXCHANGE_DENIED: TokenStatus

class WatchLinkEventsRequest(_message.Message):
    __slots__ = ("after",)
    AFTER_FIELD_NUMBER: _ClassVar[int]
    after: str
    def __init__(self, after: _Optional[str] = ...) -> None: ...

class WatchLinkEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: LinkEvent
    def __init__(self, event: _Optional[_Union[LinkEvent, _Mapping]] = ...) -> None: ...

class LinkEvent(_message.Message):
    __slots__ = ("id", "type", "occurred_at", "user_id", "error", "forced", "recovered_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    occurred_at: _timestamp_pb2.Timestamp
    user_id: str
    error: str
    forced: bool
    recovered_by: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., error: _Optional[str] = ..., forced: _Optional[bool] = ..., recovered_by: _Optional[str] = ...) -> None: ...

class GetOIDCAccessTokenRequest(_message.Message):
    __slots__ = ("user_id", "rejected_token_sha256", "resource")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    rejected_token_sha256: str
    resource: str
    def __init__(self, user_id: _Optional[str] = ..., rejected_token_sha256: _Optional[str] = ..., resource: _Optional[str] = ...) -> None: ...

class GetOIDCAccessTokenResponse(_message.Message):
    __slots__ = ("access_token", "expires_at", "status")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    expires_at: _timestamp_pb2.Timestamp
    status: TokenStatus
    def __init__(self, access_token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[TokenStatus, str]] = ...) -> None: ...
