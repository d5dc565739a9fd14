"""Hand-written, annotated MQTT byte fixtures.

Each fixture is ``(name, level, bytes, packet)``.  The bytes are written by
hand from the OASIS MQTT 3.1 / 3.1.1 / 5.0 specifications, NOT produced by
the encoder under test.  ``FIXTURES`` round-trip exactly (decode gives the
packet, encode gives the bytes); ``DECODE_ONLY`` are legal alternative forms
that decode to the packet but that the encoder writes differently.
"""
from __future__ import annotations

from typing import NamedTuple

from mqttd.codec import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback,
    Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe, Will,
)


def hexb(text: str) -> bytes:
    """Bytes from hex digits; ``#`` starts a comment up to the end of the line."""
    return bytes.fromhex(" ".join(line.split("#", 1)[0] for line in text.splitlines()))


class Fixture(NamedTuple):
    name: str
    level: int
    data: bytes
    packet: object


FIXTURES = [
    # ------------------------------------------------------------------ MQTT 3.1
    Fixture("v3_connect_minimal", 3, hexb("""
        10 10                    # CONNECT, remaining length 16
        00 06 4d 51 49 73 64 70  # protocol name "MQIsdp"
        03                       # protocol level 3
        02                       # flags: clean session
        00 3c                    # keep alive 60
        00 02 63 31              # client id "c1"
    """), Connect(protocol_level=3, client_id="c1", keepalive=60)),
    Fixture("v3_connect_username_password", 3, hexb("""
        10 17                    # CONNECT, remaining length 23
        00 06 4d 51 49 73 64 70  # "MQIsdp"
        03                       # level 3
        c2                       # flags: user name, password, clean session
        00 00                    # keep alive 0
        00 02 63 31              # client id "c1"
        00 01 75                 # user name "u"
        00 02 70 77              # password b"pw"
    """), Connect(protocol_level=3, client_id="c1", username="u", password=b"pw")),
    Fixture("v3_connack", 3, hexb("""
        20 02                    # CONNACK, remaining length 2
        00                       # reserved (3.1 has no session present flag)
        02                       # return code 2: identifier rejected
    """), Connack(reason_code=2)),
    Fixture("v3_publish_qos1", 3, hexb("""
        32 09                    # PUBLISH, QoS 1, remaining length 9
        00 03 61 2f 62           # topic "a/b"
        00 01                    # packet id 1
        68 69                    # payload "hi"
    """), Publish("a/b", b"hi", qos=1, packet_id=1)),
    Fixture("v3_puback", 3, hexb("40 02  00 01  # PUBACK id 1"), Puback(1)),
    Fixture("v3_pubrec", 3, hexb("50 02  00 02  # PUBREC id 2"), Pubrec(2)),
    Fixture("v3_pubrel", 3, hexb("62 02  00 02  # PUBREL (flags 0010) id 2"), Pubrel(2)),
    Fixture("v3_pubcomp", 3, hexb("70 02  00 02  # PUBCOMP id 2"), Pubcomp(2)),
    Fixture("v3_subscribe", 3, hexb("""
        82 08                    # SUBSCRIBE (flags 0010), remaining length 8
        00 05                    # packet id 5
        00 03 61 2f 2b           # filter "a/+"
        02                       # requested QoS 2
    """), Subscribe(5, (Subscription("a/+", 2),))),
    Fixture("v3_suback", 3, hexb("90 03  00 05  02  # SUBACK id 5, granted QoS 2"),
            Suback(5, (2,))),
    Fixture("v3_unsubscribe", 3, hexb("""
        a2 07                    # UNSUBSCRIBE (flags 0010), remaining length 7
        00 06                    # packet id 6
        00 03 61 2f 2b           # filter "a/+"
    """), Unsubscribe(6, ("a/+",))),
    Fixture("v3_unsuback", 3, hexb("b0 02  00 06  # UNSUBACK id 6"), Unsuback(6)),
    Fixture("v3_pingreq", 3, hexb("c0 00"), Pingreq()),
    Fixture("v3_pingresp", 3, hexb("d0 00"), Pingresp()),
    Fixture("v3_disconnect", 3, hexb("e0 00"), Disconnect()),

    # ---------------------------------------------------------------- MQTT 3.1.1
    Fixture("v4_connect_minimal", 4, hexb("""
        10 0e                    # CONNECT, remaining length 14
        00 04 4d 51 54 54        # protocol name "MQTT"
        04                       # protocol level 4
        02                       # flags: clean session
        00 3c                    # keep alive 60
        00 02 63 31              # client id "c1"
    """), Connect(client_id="c1", keepalive=60)),
    Fixture("v4_connect_empty_client_id", 4, hexb("""
        10 0c                    # CONNECT, remaining length 12
        00 04 4d 51 54 54 04     # "MQTT", level 4
        02 00 00                 # clean session, keep alive 0
        00 00                    # client id ""
    """), Connect(client_id="")),
    Fixture("v4_connect_will_username_password", 4, hexb("""
        10 1e                    # CONNECT, remaining length 30
        00 04 4d 51 54 54        # "MQTT"
        04                       # level 4
        ec                       # flags: user name 80, password 40, will retain 20,
                                 #        will QoS 1 (08), will 04; clean session 0
        00 0a                    # keep alive 10
        00 02 63 6c              # client id "cl"
        00 03 77 2f 74           # will topic "w/t"
        00 03 62 79 65           # will payload b"bye"
        00 01 75                 # user name "u"
        00 01 70                 # password b"p"
    """), Connect(client_id="cl", clean_start=False, keepalive=10, username="u",
                  password=b"p", will=Will("w/t", b"bye", qos=1, retain=True))),
    Fixture("v4_connack_session_present", 4, hexb("""
        20 02                    # CONNACK
        01                       # session present
        00                       # accepted
    """), Connack(session_present=True)),
    Fixture("v4_connack_not_authorized", 4, hexb("20 02  00  05  # return code 5"),
            Connack(reason_code=5)),
    Fixture("v4_publish_qos0", 4, hexb("""
        30 0a                    # PUBLISH QoS 0, remaining length 10
        00 03 61 2f 62           # topic "a/b"
        68 65 6c 6c 6f           # payload "hello" (no packet id at QoS 0)
    """), Publish("a/b", b"hello")),
    Fixture("v4_publish_qos1_dup_retain", 4, hexb("""
        3b 08                    # PUBLISH: DUP 8 | QoS 1 (2) | RETAIN 1
        00 03 61 2f 62           # topic "a/b"
        12 34                    # packet id 0x1234
        78                       # payload "x"
    """), Publish("a/b", b"x", qos=1, retain=True, dup=True, packet_id=0x1234)),
    Fixture("v4_publish_qos2_empty_payload", 4, hexb("""
        34 07                    # PUBLISH QoS 2 (4)
        00 03 61 2f 62           # topic "a/b"
        ff ff                    # packet id 65535
                                 # empty payload
    """), Publish("a/b", b"", qos=2, packet_id=65535)),
    Fixture("v4_publish_utf8_topic", 4, hexb("""
        30 09                    # PUBLISH QoS 0
        00 06 c3 a9 2f e2 82 ac  # topic "é/€" (6 bytes of UTF-8)
        00                       # payload b"\\x00"
    """), Publish("\u00e9/\u20ac", b"\x00")),
    Fixture("v4_publish_two_byte_remaining_length", 4,
            hexb("""
        30 cd 01                 # PUBLISH QoS 0, remaining length 205 (0x4d + 1*128)
        00 03 61 2f 62           # topic "a/b"
    """) + b"\xab" * 200,        # payload: 200 bytes
            Publish("a/b", b"\xab" * 200)),
    Fixture("v4_puback", 4, hexb("40 02  00 01"), Puback(1)),
    Fixture("v4_pubrec", 4, hexb("50 02  00 02"), Pubrec(2)),
    Fixture("v4_pubrel", 4, hexb("62 02  00 02"), Pubrel(2)),
    Fixture("v4_pubcomp", 4, hexb("70 02  00 02"), Pubcomp(2)),
    Fixture("v4_subscribe_two_filters", 4, hexb("""
        82 0c                    # SUBSCRIBE, remaining length 12
        00 0a                    # packet id 10
        00 03 61 2f 23 01        # "a/#" QoS 1
        00 01 62 02              # "b"   QoS 2
    """), Subscribe(10, (Subscription("a/#", 1), Subscription("b", 2)))),
    Fixture("v4_suback_with_failure", 4, hexb("""
        90 05                    # SUBACK
        00 0a                    # packet id 10
        01 02 80                 # granted 1, granted 2, failure
    """), Suback(10, (1, 2, 0x80))),
    Fixture("v4_unsubscribe_two_filters", 4, hexb("""
        a2 0a                    # UNSUBSCRIBE, remaining length 10
        00 0b                    # packet id 11
        00 03 61 2f 23           # "a/#"
        00 01 62                 # "b"
    """), Unsubscribe(11, ("a/#", "b"))),
    Fixture("v4_unsuback", 4, hexb("b0 02  00 0b"), Unsuback(11)),
    Fixture("v4_pingreq", 4, hexb("c0 00"), Pingreq()),
    Fixture("v4_pingresp", 4, hexb("d0 00"), Pingresp()),
    Fixture("v4_disconnect", 4, hexb("e0 00"), Disconnect()),

    # ------------------------------------------------------------------ MQTT 5.0
    Fixture("v5_connect_minimal", 5, hexb("""
        10 0f                    # CONNECT, remaining length 15
        00 04 4d 51 54 54        # "MQTT"
        05                       # level 5
        02                       # clean start
        00 3c                    # keep alive 60
        00                       # property length 0
        00 02 63 31              # client id "c1"
    """), Connect(protocol_level=5, client_id="c1", keepalive=60)),
    Fixture("v5_connect_all_properties_and_will", 5, hexb("""
        10 66                    # CONNECT, remaining length 102
        00 04 4d 51 54 54        # "MQTT"
        05                       # level 5
        d6                       # flags: user name 80, password 40, will QoS 2 (10),
                                 #        will 04, clean start 02
        00 1e                    # keep alive 30
        26                       # property length 38
          11 00 00 0e 10         #   session expiry interval 3600
          15 00 03 74 6f 6b      #   authentication method "tok"
          16 00 02 01 02         #   authentication data 01 02
          17 00                  #   request problem information 0
          19 01                  #   request response information 1
          21 00 14               #   receive maximum 20
          22 00 0a               #   topic alias maximum 10
          26 00 01 6b 00 01 76   #   user property ("k", "v")
          27 00 00 04 00         #   maximum packet size 1024
        00 02 63 31              # client id "c1"
        21                       # will property length 33
          01 01                  #   payload format indicator 1 (UTF-8)
          02 00 00 00 3c         #   message expiry interval 60
          03 00 03 74 2f 70      #   content type "t/p"
          08 00 01 72            #   response topic "r"
          09 00 01 63            #   correlation data b"c"
          18 00 00 00 05         #   will delay interval 5
          26 00 01 61 00 01 62   #   user property ("a", "b")
        00 03 77 2f 74           # will topic "w/t"
        00 02 6f 6b              # will payload b"ok"
        00 01 75                 # user name "u"
        00 01 70                 # password b"p"
    """), Connect(
        protocol_level=5, client_id="c1", keepalive=30, username="u", password=b"p",
        properties=Properties(
            session_expiry_interval=3600, authentication_method="tok",
            authentication_data=b"\x01\x02", request_problem_information=0,
            request_response_information=1, receive_maximum=20,
            topic_alias_maximum=10, user_properties=(("k", "v"),),
            maximum_packet_size=1024),
        will=Will("w/t", b"ok", qos=2, properties=Properties(
            payload_format_indicator=1, message_expiry_interval=60,
            content_type="t/p", response_topic="r", correlation_data=b"c",
            will_delay_interval=5, user_properties=(("a", "b"),))))),
    Fixture("v5_connect_password_without_username", 5, hexb("""
        10 13                    # CONNECT, remaining length 19
        00 04 4d 51 54 54 05     # "MQTT", level 5
        42                       # flags: password 40 (no user name: allowed in 5.0), clean
        00 00 00                 # keep alive 0, property length 0
        00 02 63 31              # client id "c1"
        00 02 70 77              # password b"pw"
    """), Connect(protocol_level=5, client_id="c1", password=b"pw")),
    Fixture("v5_connack_all_properties", 5, hexb("""
        20 35                    # CONNACK, remaining length 53
        01                       # session present
        00                       # reason code 0 success
        32                       # property length 50
          11 00 00 00 78         #   session expiry interval 120
          12 00 03 61 62 63      #   assigned client identifier "abc"
          13 00 1e               #   server keep alive 30
          1a 00 02 72 69         #   response information "ri"
          1c 00 02 73 32         #   server reference "s2"
          1f 00 02 6f 6b         #   reason string "ok"
          21 00 64               #   receive maximum 100
          22 00 05               #   topic alias maximum 5
          24 01                  #   maximum QoS 1
          25 00                  #   retain available 0
          27 00 01 00 00         #   maximum packet size 65536
          28 01                  #   wildcard subscription available 1
          29 01                  #   subscription identifier available 1
          2a 00                  #   shared subscription available 0
    """), Connack(session_present=True, properties=Properties(
        session_expiry_interval=120, assigned_client_identifier="abc",
        server_keep_alive=30, response_information="ri", server_reference="s2",
        reason_string="ok", receive_maximum=100, topic_alias_maximum=5,
        maximum_qos=1, retain_available=0, maximum_packet_size=65536,
        wildcard_subscription_available=1, subscription_identifier_available=1,
        shared_subscription_available=0))),
    Fixture("v5_connack_not_authorized", 5, hexb("""
        20 03  00  87  00        # CONNACK, no session, 0x87 not authorized, no properties
    """), Connack(reason_code=0x87)),
    Fixture("v5_publish_all_properties", 5, hexb("""
        32 47                    # PUBLISH QoS 1, remaining length 71
        00 03 61 2f 62           # topic "a/b"
        00 07                    # packet id 7
        3d                       # property length 61
          01 01                  #   payload format indicator 1
          02 00 00 00 0a         #   message expiry interval 10
          03 00 0a 74 65 78 74 2f 70 6c 61 69 6e  # content type "text/plain"
          08 00 03 72 2f 74      #   response topic "r/t"
          09 00 03 01 02 03      #   correlation data 01 02 03
          0b 05                  #   subscription identifier 5
          0b 80 01               #   subscription identifier 128 (two byte varint)
          23 00 02               #   topic alias 2
          26 00 01 61 00 01 31   #   user property ("a", "1")
          26 00 01 62 00 01 32   #   user property ("b", "2")
          26 00 01 61 00 01 33   #   user property ("a", "3"): repeated name, order kept
        68 69                    # payload "hi"
    """), Publish("a/b", b"hi", qos=1, packet_id=7, properties=Properties(
        payload_format_indicator=1, message_expiry_interval=10,
        content_type="text/plain", response_topic="r/t",
        correlation_data=b"\x01\x02\x03", subscription_identifiers=(5, 128),
        topic_alias=2, user_properties=(("a", "1"), ("b", "2"), ("a", "3"))))),
    Fixture("v5_publish_qos0_no_properties", 5, hexb("""
        30 07                    # PUBLISH QoS 0
        00 03 61 2f 62           # topic "a/b"
        00                       # property length 0
        78                       # payload "x"
    """), Publish("a/b", b"x")),
    Fixture("v5_publish_topic_alias_only", 5, hexb("""
        30 08                    # PUBLISH QoS 0
        00 00                    # empty topic name: allowed with a topic alias
        03 23 00 01              # property length 3: topic alias 1
        68 69                    # payload "hi"
    """), Publish("", b"hi", properties=Properties(topic_alias=1))),
    Fixture("v5_puback_short", 5, hexb("40 02  00 01  # success, no properties"),
            Puback(1)),
    Fixture("v5_puback_reason_only", 5, hexb("""
        40 03  00 01             # PUBACK id 1
        10                       # 0x10 no matching subscribers (no property length)
    """), Puback(1, 0x10)),
    Fixture("v5_pubrec_reason_string", 5, hexb("""
        50 09  00 02             # PUBREC id 2
        80                       # 0x80 unspecified error
        05 1f 00 02 6e 6f        # property length 5: reason string "no"
    """), Pubrec(2, 0x80, Properties(reason_string="no"))),
    Fixture("v5_pubrel_not_found", 5, hexb("62 03  00 03  92  # 0x92 id not found"),
            Pubrel(3, 0x92)),
    Fixture("v5_pubcomp_user_property", 5, hexb("""
        70 0b  00 04             # PUBCOMP id 4
        00                       # success
        07 26 00 01 6b 00 01 76  # property length 7: user property ("k", "v")
    """), Pubcomp(4, 0, Properties(user_properties=(("k", "v"),)))),
    Fixture("v5_subscribe_options", 5, hexb("""
        82 16                    # SUBSCRIBE, remaining length 22
        00 0a                    # packet id 10
        09                       # property length 9
          0b 2a                  #   subscription identifier 42
          26 00 01 6b 00 01 76   #   user property ("k", "v")
        00 03 61 2f 23           # "a/#"
        2d                       #   retain handling 2 (20), RAP 08, no local 04, QoS 1
        00 01 62                 # "b"
        12                       #   retain handling 1 (10), QoS 2
    """), Subscribe(10, (
        Subscription("a/#", 1, no_local=True, retain_as_published=True, retain_handling=2),
        Subscription("b", 2, retain_handling=1)),
        Properties(subscription_identifiers=(42,), user_properties=(("k", "v"),)))),
    Fixture("v5_suback_reason_codes", 5, hexb("""
        90 0a  00 0a             # SUBACK id 10
        05 1f 00 02 6e 6f        # property length 5: reason string "no"
        01 a2                    # granted QoS 1, 0xA2 wildcards not supported
    """), Suback(10, (1, 0xA2), Properties(reason_string="no"))),
    Fixture("v5_unsubscribe", 5, hexb("""
        a2 08  00 0b             # UNSUBSCRIBE id 11
        00                       # property length 0
        00 03 61 2f 23           # "a/#"
    """), Unsubscribe(11, ("a/#",))),
    Fixture("v5_unsuback_reason_codes", 5, hexb("""
        b0 05  00 0b             # UNSUBACK id 11
        00                       # property length 0
        00 11                    # success, 0x11 no subscription existed
    """), Unsuback(11, (0, 0x11))),
    Fixture("v5_pingreq", 5, hexb("c0 00"), Pingreq()),
    Fixture("v5_pingresp", 5, hexb("d0 00"), Pingresp()),
    Fixture("v5_disconnect_short", 5, hexb("e0 00  # normal disconnection"), Disconnect()),
    Fixture("v5_disconnect_with_will", 5, hexb("e0 01  04  # 0x04 with will message"),
            Disconnect(0x04)),
    Fixture("v5_disconnect_reason_string", 5, hexb("""
        e0 0a                    # DISCONNECT, remaining length 10
        8e                       # 0x8E session taken over
        08 1f 00 05 74 61 6b 65 6e  # property length 8: reason string "taken"
    """), Disconnect(0x8E, Properties(reason_string="taken"))),
    Fixture("v5_auth_success_short", 5, hexb("f0 00"), Auth()),
    Fixture("v5_auth_continue", 5, hexb("""
        f0 0d                    # AUTH, remaining length 13
        18                       # 0x18 continue authentication
        0b                       # property length 11
          15 00 03 74 6f 6b      #   authentication method "tok"
          16 00 02 01 02         #   authentication data 01 02
    """), Auth(0x18, Properties(authentication_method="tok",
                                authentication_data=b"\x01\x02"))),
]


DECODE_ONLY = [
    Fixture("v5_puback_long_form_success", 5, hexb("""
        40 04  00 01  00  00     # PUBACK id 1, success, property length 0
    """), Puback(1)),
    Fixture("v5_disconnect_long_form", 5, hexb("e0 02  00 00  # success, no properties"),
            Disconnect()),
    Fixture("v5_connack_without_property_length", 5, hexb("20 02  00 00"), Connack()),
    Fixture("v5_properties_out_of_order", 5, hexb("""
        30 0c                    # PUBLISH QoS 0, remaining length 12
        00 01 74                 # topic "t"
        08                       # property length 8, identifiers in descending order
          23 00 09               #   topic alias 9
          02 00 00 00 01         #   message expiry interval 1
    """), Publish("t", b"", properties=Properties(topic_alias=9,
                                                  message_expiry_interval=1))),
    Fixture("v4_remaining_length_not_minimal", 4, hexb("""
        c0 80 00                 # PINGREQ with remaining length 0 in two bytes
    """), Pingreq()),
]
