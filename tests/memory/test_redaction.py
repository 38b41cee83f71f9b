"""A trusted reviewer's answer keeps the company's voice; a placeholder is never a target."""

from __future__ import annotations

from feedback.redaction import Redactor, company_voice, has_placeholder

ANSWER = ("Call 0800 414 7782 or write to help@bramblewood.co.uk; set the router to "
          "192.168.1.1.")


def test_the_companys_contacts_and_addresses_stay_as_written() -> None:
    assert company_voice(Redactor(), ANSWER, ["My router will not connect"]) == ANSWER


def test_a_customers_details_echoed_back_are_still_redacted() -> None:
    out = company_voice(Redactor(), "Noted ０７７００ 900123, we will call you.",
                        ["my number is 07700 900123"])
    assert out == "Noted [PHONE], we will call you." and has_placeholder(out)


def test_what_the_approved_answers_shown_hold_is_the_companys_even_when_echoed() -> None:
    """The answer corrected repeated the company's number from the approved answers its
    prompt quoted: that is not a customer's detail; the customer's own number still is."""
    text = "Call 0800 414 7782; we will call you back on 07700 900123."
    echoed = ["call me on 07700 900123", "You can call 0800 414 7782."]
    assert company_voice(Redactor(), text, echoed) == \
        "Call [PHONE]; we will call you back on [PHONE]."
    assert company_voice(Redactor(), text, echoed, ["Call us on 0800 414 7782."]) == \
        "Call 0800 414 7782; we will call you back on [PHONE]."


def test_keys_and_credentials_never_stay() -> None:
    out = company_voice(Redactor(), "use https://admin:hunter2@example.com/x", [])
    assert has_placeholder(out) and "hunter2" not in out


def test_placeholders_are_recognised() -> None:
    assert has_placeholder("call [PHONE] now") and not has_placeholder("call us [soon]")
