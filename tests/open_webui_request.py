"""The request Open WebUI's browser chat sends to a model server, for replay tests.

Open WebUI (native function calling on) sends its built-in tools with every message.
It builds each tool's schema from a Python function: the name, the docstring's first
paragraph as the description, one property per parameter (type from the annotation,
description from the `:param x:` line), parameters without a default are required.
`BUILTIN` below spells 36 such tools (time, web search, images, code interpreter,
memory, notes, chats, channels, knowledge, files) the way that conversion writes them.
`ollama_chat_body` is its /api/chat body (converted from its OpenAI-shaped payload:
`options` only holds what the user set, `keep_alive`/`format` only when set);
`openai_chat_body` the same chat for /v1/chat/completions.
"""

from __future__ import annotations


def _tool(name: str, description: str, params: dict[str, tuple[str, str, bool]] | None = None) -> dict:
    """One tool schema; params: name -> (json type, description, required)."""
    params = params or {}
    props = {}
    for pname, (ptype, pdesc, _) in params.items():
        props[pname] = ({"type": "array", "items": {"type": "string"}, "description": pdesc}
                        if ptype == "array" else {"type": ptype, "description": pdesc})
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props,
                       "required": [p for p, (_, _, req) in params.items() if req]}}}


_S, _I, _A, _B = "string", "integer", "array", "boolean"
_LIMIT = (_I, "Maximum number of results to return (default: 10)", False)

BUILTIN: list[dict] = [
    # time
    _tool("get_current_timestamp", "Get the current Unix timestamp in seconds."),
    _tool("calculate_timestamp", "Get the current Unix timestamp, optionally adjusted by days, weeks, months, "
          "or years. Use this to calculate timestamps for date filtering in search functions.",
          {"days_ago": (_I, "Number of days to subtract from current time (default: 0)", False),
           "weeks_ago": (_I, "Number of weeks to subtract from current time (default: 0)", False),
           "months_ago": (_I, "Number of months to subtract from current time (default: 0)", False),
           "years_ago": (_I, "Number of years to subtract from current time (default: 0)", False)}),
    # web
    _tool("search_web", "Search the public web for information. Best for current events, external references, "
          "or topics not covered in internal documents.",
          {"query": (_S, "The search query to look up", True),
           "count": (_I, "Number of results to return (default: 5)", False)}),
    _tool("fetch_url", "Fetch and extract the main text content from a web page URL.",
          {"url": (_S, "The URL to fetch content from", True)}),
    # images
    _tool("generate_image", "Generate an image based on a text prompt.",
          {"prompt": (_S, "A detailed description of the image to generate", True)}),
    _tool("edit_image", "Edit existing images based on a text prompt.",
          {"prompt": (_S, "A description of the changes to make to the images", True),
           "image_urls": (_A, "A list of URLs of the images to edit", True)}),
    # code interpreter
    _tool("execute_code", "Execute Python code in a sandboxed environment and return the output. Use this to "
          "perform calculations, data analysis, generate visualizations, or run any Python code that would "
          "help answer the user's question.",
          {"code": (_S, "The Python code to execute", True)}),
    # memory
    _tool("search_memories", "Search the user's stored memories for information relevant to a query.",
          {"query": (_S, "The search query to find relevant memories", True),
           "count": (_I, "Number of memories to return (default: 5)", False)}),
    _tool("add_memory", "Store a new memory about the user for future conversations.",
          {"content": (_S, "The memory content to store", True)}),
    _tool("replace_memory_content", "Update the content of an existing memory by its ID.",
          {"memory_id": (_S, "The ID of the memory to update", True),
           "content": (_S, "The new content for the memory", True)}),
    _tool("delete_memory", "Delete a stored memory by its ID.",
          {"memory_id": (_S, "The ID of the memory to delete", True)}),
    _tool("list_memories", "List all memories stored for the user."),
    # notes
    _tool("search_notes", "Search the user's notes by title and content.",
          {"query": (_S, "The search query", True), "count": _LIMIT,
           "start_timestamp": (_I, "Only notes updated after this Unix timestamp", False),
           "end_timestamp": (_I, "Only notes updated before this Unix timestamp", False)}),
    _tool("view_note", "Get the full content of a note by its ID.",
          {"note_id": (_S, "The ID of the note", True)}),
    _tool("write_note", "Create a new note with a title and markdown content.",
          {"title": (_S, "The title of the note", True), "content": (_S, "The markdown content", True)}),
    _tool("replace_note_content", "Replace the content of an existing note.",
          {"note_id": (_S, "The ID of the note", True), "content": (_S, "The new markdown content", True),
           "title": (_S, "A new title (optional)", False)}),
    _tool("list_notes", "List the user's notes, newest first.", {"count": _LIMIT}),
    # chats
    _tool("search_chats", "Search the user's previous chats by title and message content.",
          {"query": (_S, "The search query", True), "count": _LIMIT,
           "start_timestamp": (_I, "Only chats updated after this Unix timestamp", False),
           "end_timestamp": (_I, "Only chats updated before this Unix timestamp", False)}),
    _tool("view_chat", "Get the messages of a previous chat by its ID.",
          {"chat_id": (_S, "The ID of the chat", True)}),
    _tool("list_chats", "List the user's recent chats.", {"count": _LIMIT}),
    # channels
    _tool("search_channels", "Search the channels the user can read by name and description.",
          {"query": (_S, "The search query", True), "count": _LIMIT}),
    _tool("search_channel_messages", "Search messages in the channels the user can read.",
          {"query": (_S, "The search query", True),
           "channel_id": (_S, "Only search this channel (optional)", False), "count": _LIMIT,
           "start_timestamp": (_I, "Only messages after this Unix timestamp", False),
           "end_timestamp": (_I, "Only messages before this Unix timestamp", False)}),
    _tool("view_channel_message", "Get a channel message by its ID.",
          {"message_id": (_S, "The ID of the message", True)}),
    _tool("view_channel_thread", "Get a message's thread: the parent message and its replies.",
          {"message_id": (_S, "The ID of the parent message", True)}),
    _tool("list_channels", "List the channels the user is a member of."),
    # knowledge
    _tool("list_knowledge_bases", "List the knowledge bases the user can read.", {"count": _LIMIT}),
    _tool("search_knowledge_bases", "Search knowledge bases by name and description.",
          {"query": (_S, "The search query", True), "count": _LIMIT}),
    _tool("query_knowledge_bases", "Search the content of knowledge bases for passages relevant to a query. "
          "Use this first for questions about internal documents.",
          {"query": (_S, "The natural-language query", True),
           "knowledge_ids": (_A, "IDs of the knowledge bases to search (default: all)", False),
           "count": (_I, "Number of passages to return (default: 5)", False)}),
    _tool("search_knowledge_files", "Search files in knowledge bases by file name.",
          {"query": (_S, "The search query", True),
           "knowledge_id": (_S, "Only search this knowledge base (optional)", False), "count": _LIMIT}),
    _tool("query_knowledge_files", "Search the content of specific files for passages relevant to a query.",
          {"query": (_S, "The natural-language query", True),
           "file_ids": (_A, "IDs of the files to search", True),
           "count": (_I, "Number of passages to return (default: 5)", False)}),
    _tool("view_knowledge_file", "Get the full text content of a knowledge file by its ID.",
          {"file_id": (_S, "The ID of the file", True)}),
    _tool("list_knowledge_files", "List the files of a knowledge base.",
          {"knowledge_id": (_S, "The ID of the knowledge base", True), "count": _LIMIT}),
    # files
    _tool("search_files", "Search the files the user uploaded by name.",
          {"query": (_S, "The search query", True), "count": _LIMIT}),
    _tool("view_file", "Get the text content of an uploaded file by its ID.",
          {"file_id": (_S, "The ID of the file", True)}),
    _tool("list_files", "List the files the user uploaded, newest first.", {"count": _LIMIT}),
    _tool("get_user_info", "Get the current user's name, email, role and settings.",
          {"include_settings": (_B, "Include the user's settings (default: false)", False)}),
]
assert len(BUILTIN) == 36, len(BUILTIN)

SYSTEM = ("You are a helpful assistant.\n\nCurrent Date: 2026-11-30\nCurrent Time: 08:00:00\n"
          "User Name: User\nUser Language: en-US\n\n"
          "Available Tools: use the tools when they help; otherwise answer directly.")
USER = "What is the capital of France? Answer in one short sentence."


def messages() -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]


def ollama_chat_body(model: str, **extra: object) -> dict:
    """Open WebUI's /api/chat body with its defaults: no options set by the user, so none sent."""
    return {"model": model, "messages": messages(), "stream": True, "tools": BUILTIN, **extra}


def openai_chat_body(model: str, **extra: object) -> dict:
    """The same chat as Open WebUI sends it to an OpenAI-compatible connection."""
    return {"model": model, "messages": messages(), "stream": True, "tools": BUILTIN,
            "stream_options": {"include_usage": True}, **extra}
