"""Examples that ship with reliever: agents files, mock scenarios and the web app."""
