"""Reply templates for the customer_service domain (Banking77 intents).

These are the project's own templates, written for this project: exactly one
short, friendly reply per Banking77 intent, keyed by the intent name and kept in
the same order as ``data/banking77/categories.json``. A template is sent only
when the intent classifier is confident; a low-confidence prediction is
escalated to a human agent instead. The replies deliberately avoid promising
specific amounts, dates or fees, and point the customer to the relevant place
in the app or to the next step to take.
"""

from __future__ import annotations

REPLY_TEMPLATES: dict[str, str] = {
    "card_arrival": (
        "Sorry your card hasn't reached you yet. You can check its delivery status in the app under Cards, "
        "and if it still hasn't arrived, let us know there so we can send a replacement."
    ),
    "card_linking": (
        "To add a card you already have to the app, go to Cards, choose to link an existing card and "
        "follow the steps to confirm it's yours."
    ),
    "exchange_rate": (
        "You can see the exchange rate we'll use for any currency in the app's Exchange section before you "
        "spend or convert. Rates move with the market, so it's worth checking right before you convert."
    ),
    "card_payment_wrong_exchange_rate": (
        "Sorry the rate on that card payment looks wrong. Open the transaction in the app to see the rate "
        "applied, and if it still doesn't look right, tap Report an issue so we can review it."
    ),
    "extra_charge_on_statement": (
        "A small unexpected charge is often a temporary check from a merchant that drops off by itself. "
        "Tap the transaction in the app for details, and report it there if you don't recognise it."
    ),
    "pending_cash_withdrawal": (
        "Cash withdrawals can show as pending for a short while until the ATM operator confirms them. "
        "If it's still pending after a few days, please contact us from the transaction in the app."
    ),
    "fiat_currency_support": (
        "You can hold and exchange a range of currencies in your account. The full list of supported "
        "currencies is shown in the app when you add a new currency balance or open Exchange."
    ),
    "card_delivery_estimate": (
        "Delivery times depend on where you live and the delivery option you chose. You can see the "
        "estimated arrival for your card in the app under Cards."
    ),
    "automatic_top_up": (
        "You can switch on automatic top-up in the app from the Top up screen. Choose the balance level "
        "that should trigger it and the amount you'd like added each time."
    ),
    "card_not_working": (
        "Sorry your card isn't working. Please check in the app that the card is active and not frozen, "
        "and if it still fails, contact us through in-app chat so we can look into it."
    ),
    "exchange_via_app": (
        "Yes, you can exchange money between currencies right in the app. Open Exchange, choose the "
        "currencies and amount, check the rate and confirm."
    ),
    "lost_or_stolen_card": (
        "Please freeze your card straight away in the app under Cards, then report it as lost or stolen "
        "there. We'll cancel it and help you order a replacement."
    ),
    "age_limit": (
        "There is a minimum age to open an account, and it can vary by country. You can find the age "
        "requirements for your country in the Help section of the app."
    ),
    "pin_blocked": (
        "Your PIN gets blocked after too many incorrect attempts to keep your card safe. You can usually "
        "unblock it from the card's security settings in the app, or contact us there for help."
    ),
    "contactless_not_working": (
        "Sorry contactless isn't working for you. Some terminals ask for a chip and PIN payment first, "
        "so try that once, and if contactless still fails, contact us through the app."
    ),
    "top_up_by_bank_transfer_charge": (
        "Any fees for topping up by bank transfer are listed in the app under your plan's fees. Your "
        "sending bank may also charge its own fee, so it's worth checking with them too."
    ),
    "pending_top_up": (
        "Some top-ups take a little while to clear before they appear in your balance. You can track the "
        "status in the app, and if it stays pending for too long, please get in touch with us there."
    ),
    "cancel_transfer": (
        "If your transfer hasn't been sent yet, you may be able to cancel it from the transaction in the "
        "app. If it has already gone through, contact us as soon as possible and we'll see what we can do."
    ),
    "top_up_limits": (
        "Top-up limits depend on your account and the top-up method. You can see your current limits in "
        "the app on the Top up screen or under your account's limits."
    ),
    "wrong_amount_of_cash_received": (
        "Sorry the ATM didn't give you the right amount. Please report it from the withdrawal in the app "
        "so we can investigate with the ATM operator."
    ),
    "card_payment_fee_charged": (
        "Some card payments, such as certain currencies or payment types, can carry a fee. Tap the "
        "payment in the app to see what the fee was for, and contact us there if it looks wrong."
    ),
    "transfer_not_received_by_recipient": (
        "Transfers can take time to arrive depending on the destination and payment network. Check the "
        "transfer status in the app, and if it shows as completed, ask the recipient to check with their bank."
    ),
    "supported_cards_and_currencies": (
        "You can see which cards and currencies are accepted for topping up in the app when you choose "
        "to top up by card. If your card isn't accepted, a bank transfer is a good alternative."
    ),
    "getting_virtual_card": (
        "You can create a virtual card in the app under Cards by choosing to add a virtual card. It's "
        "ready to use for online payments as soon as it's created."
    ),
    "card_acceptance": (
        "Your card can be used wherever its card network is accepted, both in shops and online. A few "
        "merchant types may be restricted, and you can find details in the Help section of the app."
    ),
    "top_up_reverted": (
        "Sorry your top-up was reversed. This can happen if the card issuer or bank declined it, and the "
        "money is usually returned to the original source; you can see the details in the app."
    ),
    "balance_not_updated_after_cheque_or_cash_deposit": (
        "Cash and cheque deposits can take some time to be processed before they show in your balance. "
        "If it still hasn't appeared after a while, please contact us through the app with your deposit details."
    ),
    "card_payment_not_recognised": (
        "If you don't recognise a card payment, first check the merchant details in the app, as names can "
        "differ from the shop's. If it still isn't yours, freeze your card and report the payment in the app."
    ),
    "edit_personal_details": (
        "You can update most personal details in the app under Profile or Account settings. Some changes, "
        "like your legal name, may need supporting documents."
    ),
    "why_verify_identity": (
        "We're required by law to verify who our customers are. It helps protect your account from fraud "
        "and keeps your money safe."
    ),
    "unable_to_verify_identity": (
        "Sorry you're having trouble verifying your identity. Make sure your ID is valid, your photos are "
        "clear and well lit, and your details match; if it still fails, contact us through in-app chat."
    ),
    "get_physical_card": (
        "You can view your card's PIN securely in the app under Cards, in the card's security settings. "
        "Make sure you're logged in to see it."
    ),
    "visa_or_mastercard": (
        "The card network we issue can depend on your country and card type. You can see which one is "
        "available to you when you order a card in the app."
    ),
    "topping_up_by_card": (
        "You can top up with a debit or credit card from the Top up screen in the app. If a card top-up "
        "isn't showing in your balance, check its status there and contact us if it looks stuck."
    ),
    "disposable_card_limits": (
        "Disposable virtual cards are designed for one-time use and are replaced after each payment. You "
        "can see how many you can have and any limits in the app under Cards."
    ),
    "compromised_card": (
        "If you think someone is using your card, freeze it right away in the app under Cards. Then report "
        "the payments you don't recognise there and order a new card."
    ),
    "atm_support": (
        "You can use your card at ATMs that accept its card network, in your country and abroad. Some ATM "
        "operators may charge their own fees, which they should show before you confirm."
    ),
    "direct_debit_payment_not_recognised": (
        "If you don't recognise a direct debit, check the company name in the transaction details in the "
        "app. If it still isn't yours, you can dispute it from there and we'll look into it."
    ),
    "passcode_forgotten": (
        "No problem, you can reset your passcode from the app's login screen by tapping Forgot passcode "
        "and following the steps to confirm your identity."
    ),
    "declined_cash_withdrawal": (
        "A cash withdrawal can be declined for reasons like a wrong PIN, insufficient balance, a frozen "
        "card or a limit being reached. Check your card status and limits in the app and try again."
    ),
    "pending_card_payment": (
        "A pending payment means the merchant has authorised it but hasn't completed it yet. It will update "
        "once they do, and if it's cancelled, the money is released back to your balance."
    ),
    "lost_or_stolen_phone": (
        "Sorry to hear that. Log in from another device to freeze your cards and change your passcode, or "
        "contact us straight away so we can secure your account."
    ),
    "request_refund": (
        "Refunds for purchases are handled by the merchant, so please contact them first. If you can't "
        "resolve it with them, you can raise a dispute from the transaction in the app."
    ),
    "declined_transfer": (
        "Sorry your transfer was declined. Please check the recipient details and your balance in the app, "
        "and if it keeps happening, contact us there so we can check what's blocking it."
    ),
    "Refund_not_showing_up": (
        "Refunds can take some time to appear, depending on the merchant. If it's been a while, ask the "
        "merchant for proof of the refund and contact us through the app so we can track it."
    ),
    "declined_card_payment": (
        "Sorry your card payment was declined. Please check in the app that your card isn't frozen, you "
        "have enough balance and the payment type is allowed, then try again or contact us for help."
    ),
    "pending_transfer": (
        "Transfers can stay pending while they're being processed and checked. You can follow the status "
        "in the app, and please double-check the recipient details are correct."
    ),
    "terminate_account": (
        "We're sorry to see you go. You can close your account in the app under Account settings; please "
        "move any remaining balance out first."
    ),
    "card_swallowed": (
        "Sorry the ATM kept your card. Please freeze or cancel it in the app under Cards, and you can order "
        "a replacement from there."
    ),
    "transaction_charged_twice": (
        "Sometimes a payment shows twice while one is still pending and drops off by itself. If both have "
        "completed, report the duplicate from the transaction in the app and we'll look into it."
    ),
    "verify_source_of_funds": (
        "We sometimes need to check where the money in your account comes from. You can see what's needed "
        "and upload supporting documents, such as payslips or statements, in the app when asked."
    ),
    "transfer_timing": (
        "How long a transfer takes depends on where it's coming from and the payment network used. You can "
        "see incoming money in the app as soon as it arrives, and the sender can check with their bank."
    ),
    "reverted_card_payment?": (
        "A card payment can be reversed if the merchant cancels it or doesn't complete it. The money is "
        "returned to your balance, and you can see the details by tapping the transaction in the app."
    ),
    "change_pin": (
        "You can change your PIN at many ATMs using the PIN services option. You can also check the "
        "card's security settings in the app for your options."
    ),
    "beneficiary_not_allowed": (
        "Sorry, we couldn't add or pay this beneficiary. Please check their details carefully, and if the "
        "problem continues, contact us through the app so we can explain what's happening."
    ),
    "transfer_fee_charged": (
        "Some transfers, depending on the currency or destination, can carry a fee. Tap the transfer in "
        "the app to see the fee breakdown, and contact us if something doesn't look right."
    ),
    "receiving_money": (
        "You can receive money, including your salary, using the account details shown in the app under "
        "your balance. Just share those details with your employer or the sender."
    ),
    "failed_transfer": (
        "Sorry your transfer didn't go through. Check the recipient details and your balance in the app, "
        "and if it keeps failing, contact us there and we'll help you find out why."
    ),
    "transfer_into_account": (
        "You can add money by bank transfer using your account details, which you'll find in the app under "
        "Top up or your balance details."
    ),
    "verify_top_up": (
        "For some card top-ups we may ask you to verify the card. Follow the instructions shown in the app, "
        "which will tell you where to find the verification code."
    ),
    "getting_spare_card": (
        "You can order an additional card in the app under Cards. Any costs will be shown to you before you "
        "confirm the order."
    ),
    "top_up_by_cash_or_cheque": (
        "Cash and cheque top-ups may not be available everywhere. You can see the top-up methods that "
        "are available for your account on the Top up screen in the app."
    ),
    "order_physical_card": (
        "You can order a physical card in the app under Cards by choosing to order a card. Any delivery "
        "costs and options will be shown before you confirm."
    ),
    "virtual_card_not_working": (
        "Sorry your virtual card isn't working. Check in the app that it's active and not frozen, and note "
        "that some merchants don't accept virtual or disposable cards."
    ),
    "wrong_exchange_rate_for_cash_withdrawal": (
        "Sorry the rate on your cash withdrawal doesn't look right. The ATM operator may have applied its "
        "own conversion, so check the transaction details in the app and report it there if needed."
    ),
    "get_disposable_virtual_card": (
        "Disposable virtual cards are great for safer online shopping, as their details change after each "
        "use. You can create one in the app under Cards, if it's available on your plan."
    ),
    "top_up_failed": (
        "Sorry your top-up didn't go through. Please check your card details and try again, and if it "
        "still fails, contact us through the app so we can investigate."
    ),
    "balance_not_updated_after_bank_transfer": (
        "Bank transfers can take some time to arrive, especially from abroad. If the sender confirms it has "
        "left their account and it still isn't showing, contact us through the app with the transfer details."
    ),
    "cash_withdrawal_not_recognised": (
        "If you didn't make that cash withdrawal, please freeze your card in the app right away. Then "
        "report the withdrawal from the transaction so we can investigate."
    ),
    "exchange_charge": (
        "Any fees for currency exchange depend on your plan and are shown in the app before you confirm an "
        "exchange. You can also check your plan's fees in Account settings."
    ),
    "top_up_by_card_charge": (
        "Some card top-ups can carry a fee, depending on the card used. Any charge will be shown in the app "
        "before you confirm your top-up."
    ),
    "activate_my_card": (
        "You can activate your new card in the app under Cards by following the activation steps. Once "
        "it's active, you're ready to start using it."
    ),
    "cash_withdrawal_charge": (
        "Cash withdrawals can carry a fee once you go over your plan's allowance, and some ATM operators "
        "charge their own fee. Tap the withdrawal in the app to see the details."
    ),
    "card_about_to_expire": (
        "You can order a replacement for an expiring card in the app under Cards. Delivery options and any "
        "costs will be shown before you confirm."
    ),
    "apple_pay_or_google_pay": (
        "You can add your card to Apple Pay or Google Pay from the card's settings in the app. Where it's "
        "supported, you can also top up using them from the Top up screen."
    ),
    "verify_my_identity": (
        "You can verify your identity in the app by following the verification steps. You'll usually need "
        "a valid photo ID and a quick selfie."
    ),
    "country_support": (
        "Our services are available in a number of countries. You can find the current list of supported "
        "countries in the Help section of the app."
    ),
}
